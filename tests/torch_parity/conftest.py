"""The PyTorch parity suite: without torch, the test modules skip (saying how to
install it) and the modules that import torch at the top are not collected."""
import importlib.util

collect_ignore = [] if importlib.util.find_spec("torch") else ["torch_side.py", "llama_torch.py"]
