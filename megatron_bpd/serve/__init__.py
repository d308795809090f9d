"""A small inference server speaking SGLang's native HTTP protocol (CPU development and tests)."""
