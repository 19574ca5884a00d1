"""llama.cpp itself, for tests: its quantizers, llama-quantize and its inference, through llama-cpp-python.

llama-cpp-python builds llama.cpp from source when the test extra is installed, so these are llama.cpp's own C
code paths (CPU build, no importance matrix), the reference every exported GGUF file is held to.
"""

import ctypes
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra: pip install -e '.[test]'")

GGML_TYPE_F32 = 0  # ggml's type id, for a float32 KV cache: llama.cpp's default f16 cache rounds attention


def _ggml_library() -> ctypes.CDLL:
    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return library


def ggml_quantize(weights: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """ggml's quantizer (`ggml_quantize_chunk`, what llama-quantize calls per tensor): rows of block bytes."""
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    rows, columns = weights.shape
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    packed = np.zeros((rows, columns // block_values * block_bytes), dtype=np.uint8)
    _ggml_library().ggml_quantize_chunk(int(qtype), weights.ctypes.data, packed.ctypes.data, 0, rows, columns, None)
    return packed


def llama_quantize(source: Path, destination: Path, type_name: str) -> Path:
    """llama-quantize SOURCE DESTINATION TYPE (e.g. q4_k_m), as the command line tool runs it."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + type_name.upper())
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), params) == 0
    return destination


def load(path: Path, context: int = 512):
    """A GGUF file loaded by llama.cpp, keeping the logits of every position; its KV cache in float32.

    Without llama.cpp's "extra buffer types", the weights repacked for a CPU's own matmul units: its plain CPU
    kernels are the reference, and on a CPU that reports AMX where the tiles cannot be used (seen in a virtual
    machine here), the AMX path dies of an illegal instruction. llama-cpp-python takes no argument for it, so its
    default model parameters are given with it off while the model loads."""
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def params_without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", params_without_repacking):
        return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, verbose=False,
                               n_threads=2, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


def logits(model, sequences: list[list[int]]) -> np.ndarray:
    """llama.cpp's logits at every position of each token sequence, concatenated."""
    rows = []
    for ids in sequences:
        model.reset()
        model.eval(ids)
        rows.append(np.array(model.scores[:len(ids)], dtype=np.float32))
    return np.concatenate(rows)
