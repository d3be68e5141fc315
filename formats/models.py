"""The zoo's model names, the ones a scenario may name as `model: {zoo: NAME}`: part of the
scenario format, so checking a scenario builds nothing and imports no model code. The
builders live in partitioner/zoo.py (a test keeps the two in step)."""

ZOO_MODELS = {
    "resnet18": "ResNet-18, 224x224 image, 11.7M parameters",
    "resnet50": "ResNet-50 (v1.5), 224x224 image, 25.6M parameters",
    "mobilenetv2": "MobileNetV2, 224x224 image, 3.5M parameters",
    "vgg16": "VGG-16, 224x224 image, 138M parameters (about 550 MB)",
    "bert_mini": "BERT-mini encoder: 4 layers, hidden 256, 4 heads, 128 tokens + mask",
    "gpt_exported": "GPT-like decoder shaped as torch.onnx exports it: 4 layers, hidden 256, "
                    "tied embeddings, symbolic batch/sequence (zoo length 64)",
    "bert_exported": "BERT-like encoder shaped as torch.onnx exports it: 4 layers, hidden "
                     "256, symbolic batch/sequence (zoo length 64)",
}
