"""BERT-family encoders (classifiers and sentence embedders): intake, fine-tuning, export with
onnxruntime's fused encoder operators, precision, accuracy gates and the build's stages."""
