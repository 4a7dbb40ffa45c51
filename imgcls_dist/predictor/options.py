"""What the inference commands accept, in one torch-free module so the CLI builds its help without importing
torch: the test-time augmentation views (`predictor/tta.py` implements one function per name, in this order),
the ways members combine, the forward precisions (`predictor/precision.py` resolves them), the backends that run
the forward (`predictor/backend.py`) and the default batch size."""

from typing import Literal, get_args

VIEW_NAMES = ("identity", "hflip", "vflip", "shift_up", "shift_down", "shift_left", "shift_right", "zoom_in",
              "zoom_out")
COMBINES = ("mean", "weighted", "vote")
BATCH_SIZE = 128  # images per forward, before TTA views

Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)  # predict, infer, serve
# ensemble build fits temperatures on the logits inference will see; int8 is not offered there (its quantization
# is calibrated per run, after the ensemble exists)
FLOAT_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
# Also accepted where a resolved choice is handed on to the processes that run it (batch actors, Serve replicas):
# fp16, what auto picks for CUDA devices without bf16. Not offered on the command line.
HANDED_ON_PRECISIONS = (*PRECISIONS, "fp16")
PRECISION_HELP = ("forward precision: fp32, bf16 (autocast) or auto: bf16 on CUDA GPUs (fp16 on those without "
                  "bf16) and on CPUs with native bf16 (AVX512-BF16 or AMX-BF16), else fp32 (default auto)")
INT8_HELP = ("; int8 (CPU, ONNX Runtime): static quantization calibrated on --calibration's validation images, "
             "never chosen by auto")
CALIBRATION_ROWS = 256  # validation images an int8 quantization is calibrated on

Backend = Literal["auto", "torch", "onnxruntime"]
BACKENDS: tuple[str, ...] = get_args(Backend)
BACKEND_HELP = ("what runs the forward: torch, onnxruntime (CPU, fp32 or int8; needs the onnx extra) or auto: "
                "onnxruntime where auto precision gives fp32 on a CPU and onnxruntime is installed, and for int8, "
                "else torch (default auto)")
