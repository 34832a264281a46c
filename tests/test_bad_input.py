"""Bad input to every command ends in one line that names the flag or file at fault, with exit status 2, no
traceback, and nothing half-written. Each case runs `r1lab.cli.main` in this process against tiny models, broken
files and a small HTTP server that answers like a broken OpenAI-compatible endpoint."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest

from r1lab.cli import main

REWARDS = """
THRESHOLD = 3

def raises(completions, **kw):
    return [1 / 0 for c in completions]

def short(completions, **kw):
    return [1.0]

def words(completions, **kw):
    return ["good" for c in completions]

def infinite(completions, **kw):
    return [float("inf") for c in completions]

def scalar(completions, **kw):
    return 1.0
"""


@pytest.fixture(scope="session")
def bad(tmp_path_factory, tiny_native_dir_long, tiny_llama_dir, tiny_gpt2_dir):
    """Paths the cases name: models, broken copies of them, and broken data, config, reward and GGUF files."""
    from r1lab.model.gguf_export import export_gguf

    d = tmp_path_factory.mktemp("bad")
    p = {"model": str(tiny_native_dir_long), "llama": str(tiny_llama_dir), "gpt2": str(tiny_gpt2_dir), "dir": str(d)}

    def copy(name, edit):
        shutil.copytree(tiny_native_dir_long, d / name)
        edit(d / name)
        p[name] = str(d / name)

    def set_config(path, **kw):
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **kw}))

    def no_template(path):
        (path / "chat_template.jinja").unlink()
        shutil.rmtree(path / "additional_chat_templates", ignore_errors=True)
        tc = json.loads((path / "tokenizer_config.json").read_text())
        tc.pop("chat_template", None)
        (path / "tokenizer_config.json").write_text(json.dumps(tc))

    copy(
        "truncated_weights",
        lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:1000]),
    )
    copy("string_size", lambda m: set_config(m, hidden_size="big"))
    copy("zero_heads", lambda m: set_config(m, num_attention_heads=0))
    copy("list_config", lambda m: (m / "config.json").write_text("[1, 2]"))
    copy("no_template", no_template)
    copy(
        "yarn_beta",
        lambda m: set_config(
            m,
            rope_parameters={  # a YaRN beta llama.cpp's deepseek2 cannot take
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 16,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "rope_theta": 10000.0,
            },
        ),
    )
    files = {
        "rewards.py": REWARDS,
        "syntax.py": "def f(:\n",
        "broken.jsonl": '{"prompt": "1+1", "completion": "2"}\n{"prompt": "2+2"\n',
        "empty.jsonl": "",
        "keys.jsonl": '{"question": "1+1", "answer": "2"}\n',
        "list.yaml": "- 1\n- 2\n",
        "syntax.yaml": "grpo:\n  steps: 2\n   lr: 3\n",
        "unknown.yaml": "kk: 3\n",
        "group.yaml": "pretrain: 3\n",
        "stepz.yaml": "pretrain:\n  stepz: 3\n",
        "notes.txt": "keep me\n",
        "good.jsonl": '{"prompt": "1+1=", "completion": "2"}\n',
    }
    for name, text in files.items():
        (d / name).write_text(text)
        p[name] = str(d / name)
    (d / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    p["latin1.jsonl"] = str(d / "latin1.jsonl")
    (d / "data" / "gsm8k").mkdir(parents=True)  # a benchmark folder (R1LAB_DATA) whose file is cut mid-line
    (d / "data" / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+')
    p["data"] = str(d / "data")
    (d / "run").mkdir()  # a run directory whose config.yaml was edited by hand
    shutil.copytree(tiny_native_dir_long, d / "run" / "model")
    (d / "run" / "config.yaml").write_text("tasks: arithmetic\ntask_args: [1]\n")
    p["run"] = str(d / "run")
    for name, state in (("garbled_state", b"not a torch file"), ("no_state", None)):  # damaged SFT checkpoints
        shutil.copytree(tiny_native_dir_long, d / name / "checkpoint")
        if state is not None:
            (d / name / "checkpoint" / "trainer_state.pt").write_bytes(state)
        p[name] = str(d / name)
    export_gguf(tiny_llama_dir, d / "llama.gguf")
    data = (d / "llama.gguf").read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) // 3])
    (d / "magic.gguf").write_bytes(b"GGUF")
    export_gguf(tiny_native_dir_long, d / "deepseek2.gguf")  # llama.cpp's arch, which transformers does not read
    shutil.copy(tiny_native_dir_long / "config.json", d / "config.gguf")
    for name in ("truncated.gguf", "magic.gguf", "deepseek2.gguf", "config.gguf"):
        p[name] = str(d / name)
    return p


class Endpoint(http.server.BaseHTTPRequestHandler):
    """POST /<mode>/v1/chat/completions answers as `mode` says: each a way an endpoint breaks."""

    REPLIES = {
        "html": (200, "text/html", b"<html><body>Welcome to nginx!</body></html>"),
        "cut": (200, "application/json", b'{"choices": [{"message": '),
        "models": (200, "application/json", b'{"object": "list", "data": [{"id": "m"}]}'),
        "number": (200, "application/json", b'{"choices": [{"message": {"content": 42}}]}'),
        "500": (500, "text/plain", b"internal error"),
        "404": (404, "application/json", b'{"error": {"message": "The model m does not exist"}}'),
    }

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        status, kind, body = self.REPLIES[self.path.split("/")[1]]
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def case(name, argv, names, untouched=None, env=None):
    """`argv` and `untouched` take {model}, {tmp}, {url}, {port} and the names of the `bad` fixture's files;
    `names` must appear in the error line; `untouched` is a path the command must leave as it was: a file keeps its
    bytes, a path that did not exist still does not, and "run:PATH" (an error met once training has begun) may be a
    run directory, but one without a checkpoint or a model."""
    return pytest.param(argv, names, untouched, env or {}, id=name)


G = [
    "--steps",
    "1",
    "--prompts-per-step",
    "1",
    "--num-generations",
    "2",
    "--max-new-tokens",
    "4",
    "--eval-problems",
    "1",
    "--save-every",
    "1",
]
E = ["--limit", "1", "--k", "1", "--greedy", "false"]

CASES = [
    # global flags and environment
    case("threads-zero", ["--threads", "0", "info", "{model}"], "--threads must be >= 1"),
    case("threads-env-not-a-number", ["info", "{model}"], "R1LAB_THREADS", env={"R1LAB_THREADS": "many"}),
    # generate
    case("generate-missing-model", ["generate", "{tmp}/nope", "--prompt", "x"], "{tmp}/nope"),
    case(
        "generate-config-file-as-model", ["generate", "{model}/config.json", "--prompt", "x"], "config.json is a file"
    ),
    case("generate-zero-tokens", ["generate", "{model}", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    case(
        "generate-tokens-not-int",
        ["generate", "{model}", "--prompt", "x", "--max-new-tokens", "ten"],
        "--max-new-tokens",
    ),
    case("generate-top-p-out-of-range", ["generate", "{model}", "--prompt", "x", "--top-p", "2"], "top_p"),
    case("generate-temperature-nan", ["generate", "{model}", "--prompt", "x", "--temperature", "nan"], "temperature"),
    case("generate-unknown-dtype", ["generate", "{model}", "--prompt", "x", "--dtype", "int8"], "int8"),
    case("generate-unavailable-device", ["generate", "{model}", "--prompt", "x", "--device", "tpu"], "--device"),
    case("generate-chat-without-template", ["generate", "{no_template}", "--prompt", "x", "--chat"], "--chat"),
    # info
    case("info-truncated-weights", ["info", "{truncated_weights}"], "model.safetensors is corrupt or truncated"),
    case("info-config-string-size", ["info", "{string_size}"], "hidden_size"),
    case("info-config-json-list", ["info", "{list_config}"], "config.json holds a JSON list"),
    # cost
    case("cost-unknown-preset", ["cost", "nope-model"], "nope-model"),
    case("cost-tokens-not-a-number", ["cost", "deepseek-v3-671b", "--tokens", "lots"], "--tokens"),
    case("cost-mfu-above-one", ["cost", "deepseek-v3-671b", "--gpu", "H800", "--tokens", "1T", "--mfu", "2"], "--mfu"),
    case("cost-zero-heads", ["cost", "{zero_heads}"], "num_attention_heads"),
    case("cost-binary-file-as-config", ["cost", "{model}/model.safetensors"], "model.safetensors is not a text file"),
    # pretrain: refused before anything is written
    case("pretrain-steps-not-int", ["pretrain", "--out", "{tmp}/run", "--steps", "many"], "steps", "{tmp}/run"),
    case("pretrain-negative-lr", ["pretrain", "--out", "{tmp}/run", "--lr=-1"], "lr must be > 0", "{tmp}/run"),
    case("pretrain-zero-grad-clip", ["pretrain", "--out", "{tmp}/run", "--grad-clip", "0"], "grad_clip", "{tmp}/run"),
    case(
        "pretrain-min-lr-ratio-above-one",
        ["pretrain", "--out", "{tmp}/run", "--min-lr-ratio", "3"],
        "min_lr_ratio",
        "{tmp}/run",
    ),
    case(
        "pretrain-unknown-task-knob",
        ["pretrain", "--out", "{tmp}/run", "--task-args", '{"arithmetic": {"digits": 3}}'],
        "digits",
        "{tmp}/run",
    ),
    case(
        "pretrain-unknown-model-key",
        ["pretrain", "--out", "{tmp}/run", "--model", '{"hiddn_size": 64}'],
        "hiddn_size",
        "{tmp}/run",
    ),
    case("pretrain-no-tasks", ["pretrain", "--out", "{tmp}/run", "--tasks", ""], "tasks is empty", "{tmp}/run"),
    case("pretrain-out-is-a-file", ["pretrain", "--out", "{notes.txt}", "--steps", "1"], "--out", "{notes.txt}"),
    case("pretrain-config-missing", ["pretrain", "--config", "{tmp}/c.yaml"], "--config file not found"),
    case(
        "pretrain-config-yaml-list",
        ["pretrain", "--out", "{tmp}/run", "--config", "{list.yaml}"],
        "list.yaml holds a YAML list",
        "{tmp}/run",
    ),
    case(
        "pretrain-config-yaml-syntax",
        ["pretrain", "--out", "{tmp}/run", "--config", "{syntax.yaml}"],
        "syntax.yaml is not valid YAML",
        "{tmp}/run",
    ),
    case(
        "pretrain-config-binary",
        ["pretrain", "--out", "{tmp}/run", "--config", "{model}/model.safetensors"],
        "model.safetensors is not a text file",
        "{tmp}/run",
    ),
    # eval: local model
    case("eval-out-is-a-directory", ["eval", "{model}", "--out", "{tmp}", *E], "--out"),
    case("eval-zero-k", ["eval", "{model}", "--k", "0"], "--k"),
    case("eval-task-knob-wrong-type", ["eval", "{model}", "--task-args", '{"max_digits": "x"}'], "max_digits"),
    case("eval-config-unknown-key", ["eval", "{model}", "--config", "{unknown.yaml}"], "kk"),
    case("eval-run-config-wrong-shape", ["eval", "{run}", *E], "config.yaml: tasks is a str, not a list"),
    case(
        "eval-benchmark-file-cut",
        ["eval", "{model}", "--task", "gsm8k", *E],
        "gsm8k/test.jsonl:2",
        env={"R1LAB_DATA": "{data}"},
    ),
    case(
        "eval-data-folder-missing",
        ["eval", "{model}", "--task", "gsm8k", *E],
        "R1LAB_DATA",
        env={"R1LAB_DATA": "{tmp}/no-such-folder"},
    ),
    # eval --base-url: an endpoint that answers, but not with a chat completion
    case("eval-endpoint-html", ["eval", "m", "--base-url", "{url}/html/v1", *E], "{url}/html/v1/chat/completions"),
    case("eval-endpoint-cut-json", ["eval", "m", "--base-url", "{url}/cut/v1", *E], "{url}/cut/v1/chat/completions"),
    case("eval-endpoint-wrong-shape", ["eval", "m", "--base-url", "{url}/models/v1", *E], "'choices'"),
    case("eval-endpoint-content-not-text", ["eval", "m", "--base-url", "{url}/number/v1", *E], "not a string"),
    case("eval-endpoint-500", ["eval", "m", "--base-url", "{url}/500/v1", *E], "status 500"),
    case("eval-endpoint-404", ["eval", "m", "--base-url", "{url}/404/v1", *E], "check the model name 'm'"),
    case("eval-endpoint-no-scheme", ["eval", "m", "--base-url", "localhost:8000/v1", *E], "http://"),
    # grpo --rewards: refused when loaded, before anything is written
    case(
        "grpo-reward-file-missing",
        ["grpo", "--model", "{model}", "--out", "{tmp}/run", "--rewards", "nope.py:f", "--reward-weights", "1"],
        "nope.py",
        "{tmp}/run",
    ),
    case(
        "grpo-reward-function-missing",
        [
            "grpo",
            "--model",
            "{model}",
            "--out",
            "{tmp}/run",
            "--rewards",
            "{rewards.py}:missing",
            "--reward-weights",
            "1",
        ],
        "'missing'",
        "{tmp}/run",
    ),
    case(
        "grpo-reward-not-callable",
        [
            "grpo",
            "--model",
            "{model}",
            "--out",
            "{tmp}/run",
            "--rewards",
            "{rewards.py}:THRESHOLD",
            "--reward-weights",
            "1",
        ],
        "THRESHOLD",
        "{tmp}/run",
    ),
    case(
        "grpo-reward-file-syntax-error",
        ["grpo", "--model", "{model}", "--out", "{tmp}/run", "--rewards", "{syntax.py}:f", "--reward-weights", "1"],
        "syntax.py",
        "{tmp}/run",
    ),
    case(
        "grpo-unknown-reward",
        ["grpo", "--model", "{model}", "--out", "{tmp}/run", "--rewards", "acuracy", "--reward-weights", "1"],
        "acuracy",
        "{tmp}/run",
    ),
    # grpo --rewards: the user's function misbehaves at run time; the run stops before any checkpoint or model
    case(
        "grpo-reward-raises",
        [
            "grpo",
            "--model",
            "{model}",
            "--out",
            "{tmp}/run",
            *G,
            "--rewards",
            "{rewards.py}:raises",
            "--reward-weights",
            "1",
        ],
        "ZeroDivisionError",
        "run:{tmp}/run",
    ),
    case(
        "grpo-reward-wrong-length",
        [
            "grpo",
            "--model",
            "{model}",
            "--out",
            "{tmp}/run",
            *G,
            "--rewards",
            "{rewards.py}:short",
            "--reward-weights",
            "1",
        ],
        "returned 1 values for 2",
        "run:{tmp}/run",
    ),
    case(
        "grpo-reward-not-numbers",
        [
            "grpo",
            "--model",
            "{model}",
            "--out",
            "{tmp}/run",
            *G,
            "--rewards",
            "{rewards.py}:words",
            "--reward-weights",
            "1",
        ],
        "rewards.py:words",
        "run:{tmp}/run",
    ),
    case(
        "grpo-reward-infinite",
        [
            "grpo",
            "--model",
            "{model}",
            "--out",
            "{tmp}/run",
            *G,
            "--rewards",
            "{rewards.py}:infinite",
            "--reward-weights",
            "1",
        ],
        "float inf",
        "run:{tmp}/run",
    ),
    case(
        "grpo-reward-not-a-list",
        [
            "grpo",
            "--model",
            "{model}",
            "--out",
            "{tmp}/run",
            *G,
            "--rewards",
            "{rewards.py}:scalar",
            "--reward-weights",
            "1",
        ],
        "not a list",
        "run:{tmp}/run",
    ),
    # grpo settings
    case(
        "grpo-one-generation",
        ["grpo", "--model", "{model}", "--out", "{tmp}/run", "--num-generations", "1"],
        "num_generations",
        "{tmp}/run",
    ),
    case(
        "grpo-task-knobs-not-a-mapping",
        ["grpo", "--model", "{model}", "--out", "{tmp}/run", "--task-args", '{"arithmetic": 3}'],
        "task_args.arithmetic",
        "{tmp}/run",
    ),
    case(
        "grpo-negative-grad-clip",
        ["grpo", "--model", "{model}", "--out", "{tmp}/run", "--grad-clip=-1"],
        "grad_clip",
        "{tmp}/run",
    ),
    # pipeline: every stage's settings are checked before the first stage runs
    case(
        "pipeline-group-given-a-number",
        ["pipeline", "--out", "{tmp}/run", "--config", "{group.yaml}"],
        "pretrain is a group of settings",
        "{tmp}/run",
    ),
    case(
        "pipeline-unknown-nested-key",
        ["pipeline", "--out", "{tmp}/run", "--config", "{stepz.yaml}"],
        "pretrain.stepz",
        "{tmp}/run",
    ),
    case("pipeline-late-stage-setting", ["pipeline", "--out", "{tmp}/run", "--grpo.lr=-1"], "--grpo", "{tmp}/run"),
    case(
        "pipeline-student-unknown-key",
        ["pipeline", "--out", "{tmp}/run", "--recipe", "distill", "--distill.student", '{"layers": 2}'],
        "layers",
        "{tmp}/run",
    ),
    case(
        "pipeline-unknown-task-knob",
        ["pipeline", "--out", "{tmp}/run", "--task-args", '{"digits": 3}'],
        "digits",
        "{tmp}/run",
    ),
    case("pipeline-unknown-recipe", ["pipeline", "--out", "{tmp}/run", "--recipe", "r2"], "recipe", "{tmp}/run"),
    # sft: data files
    case(
        "sft-data-bad-json-line",
        ["sft", "--model", "{model}", "--out", "{tmp}/run", "--data", "{broken.jsonl}"],
        "broken.jsonl:2",
        "run:{tmp}/run",
    ),
    case(
        "sft-data-not-utf8",
        ["sft", "--model", "{model}", "--out", "{tmp}/run", "--data", "{latin1.jsonl}"],
        "latin1.jsonl:1: not UTF-8",
        "run:{tmp}/run",
    ),
    case(
        "sft-data-empty",
        ["sft", "--model", "{model}", "--out", "{tmp}/run", "--data", "{empty.jsonl}"],
        "empty.jsonl holds no examples",
        "run:{tmp}/run",
    ),
    case(
        "sft-data-wrong-keys",
        ["sft", "--model", "{model}", "--out", "{tmp}/run", "--data", "{keys.jsonl}"],
        "keys.jsonl:1",
        "run:{tmp}/run",
    ),
    case(
        "sft-data-is-a-directory",
        ["sft", "--model", "{model}", "--out", "{tmp}/run", "--data", "{dir}"],
        "--data",
        "{tmp}/run",
    ),
    case(
        "sft-resume-garbled-trainer-state",
        ["sft", "--model", "{model}", "--out", "{garbled_state}", "--data", "{good.jsonl}"],
        "trainer_state.pt is corrupt",
        "{garbled_state}/checkpoint/trainer_state.pt",
    ),
    case(
        "sft-resume-checkpoint-without-state",
        ["sft", "--model", "{model}", "--out", "{no_state}", "--data", "{good.jsonl}"],
        "has no trainer_state.pt",
        "{no_state}/checkpoint/model.safetensors",
    ),
    case(
        "sft-eval-fraction-one",
        ["sft", "--model", "{model}", "--out", "{tmp}/run", "--data", "{keys.jsonl}", "--eval-fraction", "1"],
        "eval_fraction",
        "{tmp}/run",
    ),
    # distill
    case("distill-no-teacher", ["distill", "--student", "{model}", "--out", "{tmp}/run"], "--teacher", "{tmp}/run"),
    case(
        "distill-teacher-url-scheme",
        ["distill", "--teacher-url", "ftp://x", "--teacher-model", "m", "--student", "{model}", "--out", "{tmp}/run"],
        "--teacher-url",
        "{tmp}/run",
    ),
    case(
        "distill-three-prices",
        [
            "distill",
            "--teacher-url",
            "http://x/v1",
            "--teacher-model",
            "m",
            "--student",
            "{model}",
            "--out",
            "{tmp}/run",
            "--price-per-mtok",
            "1,2,3",
        ],
        "--price-per-mtok",
        "{tmp}/run",
    ),
    case(
        "distill-unknown-task-knob",
        [
            "distill",
            "--teacher",
            "{model}",
            "--student",
            "{model}",
            "--out",
            "{tmp}/run",
            "--task-args",
            '{"arithmetic": {"digits": 2}}',
        ],
        "digits",
        "{tmp}/run",
    ),
    # import-gguf
    case(
        "import-gguf-not-gguf",
        ["import-gguf", "{config.gguf}", "{tmp}/out"],
        "config.gguf is not a GGUF file",
        "{tmp}/out",
    ),
    case(
        "import-gguf-magic-only", ["import-gguf", "{magic.gguf}", "{tmp}/out"], "magic.gguf is truncated", "{tmp}/out"
    ),
    case(
        "import-gguf-truncated",
        ["import-gguf", "{truncated.gguf}", "{tmp}/out"],
        "truncated.gguf is truncated",
        "{tmp}/out",
    ),
    case(
        "import-gguf-unsupported-architecture",
        ["import-gguf", "{deepseek2.gguf}", "{tmp}/out"],
        "deepseek2",
        "{tmp}/out",
    ),
    case("import-gguf-missing-file", ["import-gguf", "{tmp}/x.gguf", "{tmp}/out"], "x.gguf", "{tmp}/out"),
    case("import-gguf-out-is-a-file", ["import-gguf", "{dir}/llama.gguf", "{notes.txt}"], "notes.txt", "{notes.txt}"),
    # export-gguf
    case("export-gguf-unsupported-model", ["export-gguf", "{gpt2}", "{tmp}/x.gguf"], "gpt2", "{tmp}/x.gguf"),
    case(
        "export-gguf-unsupported-setting",
        ["export-gguf", "{yarn_beta}", "{tmp}/x.gguf"],
        "beta_fast 16",
        "{tmp}/x.gguf",
    ),
    case("export-gguf-out-is-a-directory", ["export-gguf", "{model}", "{tmp}"], "is a directory"),
    case(
        "export-gguf-unknown-type",
        ["export-gguf", "{model}", "{tmp}/x.gguf", "--type", "q4_0"],
        "--type",
        "{tmp}/x.gguf",
    ),
    # serve: flags are checked, and the address bound, before the model loads
    case("serve-missing-model", ["serve", "{tmp}/nope", "--port", "0"], "{tmp}/nope"),
    case("serve-gguf-file-as-model", ["serve", "{dir}/llama.gguf", "--port", "0"], "r1lab import-gguf"),
    case("serve-port-out-of-range", ["serve", "{model}", "--port", "70000"], "--port"),
    case("serve-port-in-use", ["serve", "{model}", "--port", "{port}"], "127.0.0.1:{port}"),
    case("serve-host-not-an-address", ["serve", "{model}", "--host", "999.1.1.1", "--port", "0"], "--host"),
    case("serve-zero-max-batch", ["serve", "{model}", "--max-batch", "0"], "--max-batch"),
    case("serve-timeout-nan", ["serve", "{model}", "--header-timeout", "nan"], "--header-timeout"),
    case("serve-unknown-log-level", ["serve", "{model}", "--log-level", "loud"], "--log-level"),
    # chat
    case("chat-missing-model", ["chat", "{tmp}/nope"], "{tmp}/nope"),
    case("chat-temperature-out-of-range", ["chat", "{model}", "--temperature", "5"], "--temperature"),
    case("chat-zero-max-tokens", ["chat", "{model}", "--max-tokens", "0"], "--max-tokens"),
]


@pytest.mark.parametrize("argv, names, untouched, env", CASES)
def test_bad_input_is_one_line_naming_it_and_writes_nothing(
    argv, names, untouched, env, bad, endpoint, busy_port, tmp_path, monkeypatch, capsys
):
    from r1lab.client import ChatClient

    monkeypatch.setitem(ChatClient.__init__.__kwdefaults__, "retry_wait", 0.0)  # one quick retry, then the error
    monkeypatch.setitem(ChatClient.__init__.__kwdefaults__, "max_retries", 1)
    monkeypatch.chdir(tmp_path)
    values = {**bad, "tmp": str(tmp_path), "url": endpoint, "port": str(busy_port)}

    def fill(text: str) -> str:  # {name} placeholders; JSON braces ('{"digits": 3}') are left alone
        return re.sub(r"\{([\w.]+)\}", lambda m: values[m[1]], text)

    for k, v in env.items():
        monkeypatch.setenv(k, fill(v))
    argv = [fill(a) for a in argv]
    run_dir = bool(untouched) and untouched.startswith("run:")
    path = Path(fill(untouched.removeprefix("run:"))) if untouched else None
    before = path.read_bytes() if path is not None and path.is_file() else None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals: usage, then "r1lab COMMAND: error: ..."
        code = e.code
    err = capsys.readouterr().err
    command = next(a for a in argv if not a.startswith("-") and a != "0")
    last = err.strip().splitlines()[-1]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert last.startswith(f"r1lab {command}: "), err
    assert fill(names) in last, last
    if before is not None:
        assert path.read_bytes() == before
    elif run_dir:
        assert not {"checkpoint", "model"} & {p.name for p in path.iterdir()}, sorted(p.name for p in path.iterdir())
    elif path is not None:
        assert not path.exists(), sorted(p.name for p in path.iterdir()) if path.is_dir() else path
