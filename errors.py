"""User-facing errors: anything raised as EdgeTalkError is printed as one clear line, never a traceback."""


class EdgeTalkError(Exception):
    """A problem with the user's input, files or environment, explained in the message."""


class InputError(EdgeTalkError):
    """A file or stream the user gave cannot be used as it is."""


class SettingError(InputError, ValueError):
    """A setting out of its range (chunk, window, steps, lookahead): one line on the command line,
    and still a ValueError to Python callers."""


class BundleError(EdgeTalkError):
    """A bundle or checkpoint is refused (bad hashes, unknown schema, failed parity, wrong shapes)."""


class BackendUnavailable(EdgeTalkError):
    """A backend cannot run on this machine; the message says why."""


class SinkError(EdgeTalkError):
    """Frames can no longer be delivered (disk full, virtual camera gone); what was written stays."""


# Packages that only some commands or backends need, and the extra that installs each (the CLI's
# and the backend registry's one-line answers): export, eval and the torch backend need torch,
# running a bundle does not.
EXTRAS = {
    "torch": "torch",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxconverter_common": "onnx",
    "coremltools": "coreml",
    "mlx": "mlx",
    "cv2": "face",
    "aiortc": "serve",
    "aiohttp": "serve",
    "sounddevice": "mic",
    "pyvirtualcam": "cam",
    "matplotlib": "bench",
    "psutil": "bench",
    "skimage": "eval",
    "ray": "ray",
}
