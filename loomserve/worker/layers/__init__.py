"""The model's building blocks, one concept per file: linear layers and their methods
(``linear``), embedding and LM head (``embedding``), norm, rotary embedding, activation,
the attention layer, and the choice of torch or Triton variants (``ops``)."""
