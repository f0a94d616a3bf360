"""Compression and the device: from the teacher to the small integer generator that ships, and what it costs.

- slimming.py     GAN Slimming: the student's step, the L1 proximal step on the channel scales, dead channels
- compress.py     `compress(student) -> compact`, pure
- deploy.py       the integer weight file, the exported program, `write_device_artifacts`, like-for-like cost rows
- runtime.py      `generator.onnx`: the integer program, its ONNX graph, its check in ONNX Runtime, the teacher baseline
- reference.py    the eager integer reference that `generator.onnx` equals bit for bit
- ort_runner.py   the torch-free runner copied beside `generator.onnx` (self-contained, imports nothing of this project)
- cost.py         parameters, MACs, interleaved CPU timings, the cost rows and their ratios (same runtime, eager)
"""
