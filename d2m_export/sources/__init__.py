"""Stage 1, sources: what goes in. A model spec resolved to a directory (the embedded SmolLM2, the Hub, a GGUF
file, a local folder) and its config (`models`), its weights read lazily, one tensor at a time
(`lazy_weights`), what it costs (`params`: parameter counts; `memory`: the memory a stage needs), and the text
it is calibrated, healed and trained on (`corpora`, `data`, `shards`: token shards written by `tokenize`)."""
