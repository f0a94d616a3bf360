"""Compression and the device: from the teacher to the small integer generator that ships, and what it costs.

- slimming.py     GAN Slimming: the student's step, the L1 proximal step on the channel scales, dead channels
- compress.py     `compress(student) -> compact`, pure
- deploy.py       the integer weight file, the exported program, `write_device_artifacts`, what-ships cost rows
- runtime.py      `generator.onnx`: the ONNX graph with integer weights, its check in ONNX Runtime
- ort_runner.py   the torch-free runner copied beside `generator.onnx` (self-contained, imports nothing of this project)
- cost.py         parameters, MACs, CPU timings, the cost rows and their ratios
"""
