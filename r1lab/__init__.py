"""r1lab: DeepSeek-R1, open and runnable."""

__version__ = "0.1.0"
