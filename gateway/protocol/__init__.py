"""The OpenAI wire format as msgspec Structs.  Imports neither litestar nor torch."""
