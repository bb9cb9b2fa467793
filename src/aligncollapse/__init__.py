"""aligncollapse: predict, explain and defend against safety collapse under fine-tuning."""

__version__ = "0.1.0"
