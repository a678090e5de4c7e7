"""MiniCPM-V 2.6 engine: model, image processor, tokenizer handling and chat formatting.

Our own implementation on transformers 5.x building blocks; it loads the original
openbmb checkpoints unchanged and never executes code shipped inside a checkpoint.
"""
