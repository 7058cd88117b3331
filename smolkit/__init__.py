"""
smolkit: what train.py, sample.py, the server and the tools share, one module per job.
It imports smol.py (the model) and never the server, the tools or the three commands.

    common         one-line errors, the argument parser, device / dtype / compile choices
    data           the tokenizer, text and token files, the one .jsonl reader, the train/val split
    conversations  fine-tuning conversations: checked, rendered as ChatML, targets on the replies
    preferences    preference pairs and the DPO loss (the stage after fine-tuning)
    samplers       the batches a training step reads: text windows, packed conversations or pairs
    checkpoint     training checkpoints: atomic save, weights-only load, validate, restore
    settings       train.py's settings: defaults, checkpoint, config file and flags, in one order
    models         --init_from: the one way every command names a model
    guards         checks before the first step, the out_dir lock, signals, one-line failures
    metrics        the log lines, ETA, metrics.jsonl
    tracking       --log_to: the same rows as live curves in TensorBoard or Weights & Biases
    chat           the ChatML template, fitting a conversation, the text stream, stop strings
    decoding       the model on its device, and fast decoding (Decoder, Step over a CacheBlock)
    grammar        constrained decoding: JSON schemas and tool calls as per-step token masks
    quantize       int8 / int4 matrices for decoding
    hf             Hugging Face checkpoint directories in and out
    gguf_io        GGUF files in and out (llama.cpp's names, q/k order, tokenizer, template)
"""
