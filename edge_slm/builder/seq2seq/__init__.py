"""Encoder-decoder translation models (Marian / OPUS-MT, T5): intake and tokenizer conversion,
export with optimum (encoder + merged decoder with cache), validation against torch, int8 and the
chrF gate, and the build's stages."""
