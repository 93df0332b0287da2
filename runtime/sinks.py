"""Frame sinks: where the scheduler's frames go. All share `write(frame)` and `close()`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import InputError, SinkError
from ..models.config import FPS, SAMPLE_RATE
from .scheduler import Frame


class Sink:
    def write(self, frame: Frame) -> None:
        raise NotImplementedError

    def write_audio(self, pcm: np.ndarray) -> None:
        """Audio that belongs to the same timeline (sinks without audio ignore it)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NullSink(Sink):
    """Discards frames (benchmarks); counts them."""

    def __init__(self):
        self.frames = 0

    def write(self, frame: Frame) -> None:
        self.frames += 1


class CallbackSink(Sink):
    def __init__(self, fn: Callable[[Frame], None]):
        self.fn = fn

    def write(self, frame: Frame) -> None:
        self.fn(frame)


MP4_SUFFIXES = (".mp4", ".m4v", ".mov")


def check_out_file(out: Path, inputs: Iterable[Path | None]) -> None:
    """An mp4 --out must not be one of the command's own inputs (`run --audio a.wav --out a.wav`
    would replace the recording with a video), and must be named as one: an mp4 written under
    another suffix is a file nothing opens right. Checked before any work starts."""
    out = Path(out)
    for given in inputs:
        if given is None or not Path(given).exists() or not out.exists():
            continue
        with contextlib.suppress(OSError):
            if os.path.samefile(out, given):
                raise InputError(
                    f"--out {out} is also an input ({given}); writing the video there would "
                    "destroy it. Choose another output name"
                )
    if out.suffix.lower() not in MP4_SUFFIXES:
        raise InputError(
            f"--out {out}: the output is an mp4 video; name it {out.stem or 'out'}.mp4 "
            f"(accepted: {', '.join(MP4_SUFFIXES)})"
        )
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as {out / 'talk.mp4'}")
    if out.parent and not out.parent.is_dir():
        raise InputError(f"output folder does not exist: {out.parent}")
    if out.exists() and not os.access(out, os.W_OK):  # moved into place, it would still go
        raise InputError(f"--out {out} is read-only; choose another name or make it writable")


class Mp4Sink(Sink):
    """H.264 video at 25 fps with AAC audio, both stamped on one timeline (PyAV).

    Video pts are frame indices in 1/25 s; audio pts are sample counts in 1/16000 s. Both start at
    zero, so players keep them in sync however long the stream runs.

    `live=True` (live sessions) writes a fragmented mp4 with a keyframe every second: a file cut
    short (disk full, power loss, kill -9) plays up to its last whole second, where a plain mp4
    without its index at the end would not play at all. A write error raises SinkError once; the
    sink then stops writing and `close()` keeps what is on disk.

    Otherwise (`run`) the file is written beside `path` under a temporary name and moved onto
    `path` only once it is complete: a run that fails or is stopped leaves no torn mp4 and keeps
    whatever file `path` held before.
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int,
        with_audio: bool = True,
        crf: int = 20,
        live: bool = False,
    ):
        import av

        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise InputError(f"output folder does not exist: {self.path.parent}")
        opts = {"movflags": "frag_keyframe+empty_moov+default_base_moof"} if live else {}
        self.partial: Path | None = None
        try:
            # Our own file object: FFmpeg's buffered writer would drop write errors (a full disk
            # went unnoticed); through Python they raise at the mux that hits them.
            if live:
                self.file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
            else:
                fd, name = tempfile.mkstemp(
                    prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent or "."
                )
                self.partial = Path(name)
                self.file = os.fdopen(fd, "wb")
                # mkstemp makes it private (0600); the video gets the mode of the file it
                # replaces, or a new file's usual mode
                os.chmod(name, _mode_for(self.path))
            self.container = av.open(self.file, mode="w", format="mp4", options=opts)
        except Exception as e:
            self._discard()
            raise InputError(f"cannot write {self.path}: {e}") from None
        self.video = self.container.add_stream("libx264", rate=FPS)
        self.video.width = self.video.height = resolution
        self.video.pix_fmt = "yuv420p"
        self.video.options = {"crf": str(crf), "preset": "veryfast"}
        if live:
            self.video.options |= {"g": str(FPS), "keyint_min": str(FPS)}
        self.failed: str | None = None
        self.live = live
        self.audio = None
        if with_audio:
            self.audio = self.container.add_stream("aac", rate=SAMPLE_RATE)
            self.audio.layout = "mono"
        self.audio_samples = 0
        self.frames = 0
        self.closed = False

    def write(self, frame: Frame) -> None:
        import av

        vf = av.VideoFrame.from_ndarray(frame.rgb, format="rgb24")
        vf.pts = frame.index  # codec time base is 1/25 s
        self._mux(self.video, vf)
        self.frames += 1

    def write_audio(self, pcm: np.ndarray) -> None:
        import av

        if self.audio is None or pcm.size == 0:
            return
        af = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, dtype=np.float32)[None], format="flt", layout="mono"
        )
        af.sample_rate = SAMPLE_RATE
        af.pts = self.audio_samples  # codec time base is 1/16000 s
        self.audio_samples += pcm.shape[0]
        self._mux(self.audio, af)

    def _mux(self, stream, frame) -> None:
        if self.failed:
            raise SinkError(self.failed)
        try:
            for packet in stream.encode(frame):
                self.container.mux(packet)
        except Exception as e:  # OSError (ENOSPC, EFBIG) or FFmpeg's own error types
            self.failed = (
                f"cannot write {self.path} ({type(e).__name__}: {e}); is the disk full? "
                f"{self.frames} frames were written and stay playable"
            )
            raise SinkError(self.failed) from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if not self.failed:
                for stream in (self.video, self.audio):
                    if stream is not None:
                        for packet in stream.encode(None):
                            self.container.mux(packet)
        except Exception as e:
            self.failed = f"cannot finish {self.path} ({type(e).__name__}: {e})"
        finally:
            try:
                self.container.close()
            except Exception as e:  # the trailer could not be written: keep the first error
                self.failed = self.failed or f"cannot finish {self.path} ({type(e).__name__}: {e})"
            with contextlib.suppress(OSError):
                self.file.close()
        if self.failed and self.live:
            with contextlib.suppress(OSError):
                trim_to_whole_fragments(self.path)
        if self.partial is not None and not self.failed:
            try:
                os.replace(self.partial, self.path)
                self.partial = None
            except OSError as e:
                self.failed = f"cannot finish {self.path} ({type(e).__name__}: {e})"
        self._discard()
        if self.failed:
            raise SinkError(self.failed)

    def __exit__(self, *exc):
        if exc[0] is not None and self.partial is not None:  # stopped or failed: not the file
            self.failed = self.failed or "the run stopped before the video was complete"
            with contextlib.suppress(SinkError):
                self.close()  # which discards the temporary file
            return
        self.close()

    def _discard(self) -> None:
        """Remove the temporary file of an incomplete `run` output (the user's file is kept)."""
        if self.partial is not None:
            with contextlib.suppress(OSError):
                if getattr(self, "file", None) is not None:
                    self.file.close()
                self.partial.unlink()
            self.partial = None


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def trim_to_whole_fragments(path: Path) -> int:
    """Cut a fragmented mp4 after its last complete fragment (moof + mdat), dropping a fragment
    a failed write left half on disk, so that every byte left decodes. Returns the new size."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        pos = good = 0
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            n, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if n == 1 and len(head) == 16:  # 64-bit box size
                n = int.from_bytes(head[8:16], "big")
            if n < 8 or pos + n > size:
                break
            pos += n
            if kind in (b"ftyp", b"moov", b"mdat"):  # a fragment ends with its mdat
                good = pos
        f.truncate(good)
    return good


class VirtualCamSink(Sink):
    """Frames to a virtual camera (pyvirtualcam), RGB at 25 fps, for Zoom, Meet, OBS and the like.

    macOS: install OBS and start its virtual camera once (Tools -> Start Virtual Camera), then quit
    OBS. Linux: the v4l2loopback kernel module (`sudo modprobe v4l2loopback devices=1`). Windows:
    OBS or Unity Capture. The frames arrive already paced by the live session.
    """

    HELP = (
        "on macOS install OBS and start its virtual camera once; on Linux load v4l2loopback "
        "(sudo modprobe v4l2loopback devices=1); or use --preview, --out OUT.mp4 or --null"
    )

    @staticmethod
    def check_available() -> None:
        try:
            import pyvirtualcam  # noqa: F401
        except ImportError:
            raise InputError(
                "--virtualcam needs pyvirtualcam: pip install 'edgetalk[cam]'; then "
                + VirtualCamSink.HELP
            ) from None

    def __init__(self, resolution: int, device: str | None = None, fps: int = FPS):
        self.check_available()
        import pyvirtualcam

        try:
            self.cam = pyvirtualcam.Camera(
                width=resolution,
                height=resolution,
                fps=fps,
                fmt=pyvirtualcam.PixelFormat.RGB,
                device=device,
            )
        except Exception as e:  # pyvirtualcam raises RuntimeError for a missing device
            raise InputError(f"no virtual camera device ({e}); {VirtualCamSink.HELP}") from None
        self.frames = 0
        self.closed = False

    @property
    def device(self) -> str:
        return self.cam.device

    def write(self, frame: Frame) -> None:
        try:
            self.cam.send(np.ascontiguousarray(frame.rgb))
        except Exception as e:  # the device was removed, or OBS took it away
            raise SinkError(
                f"the virtual camera {self.device!r} stopped taking frames ({e}) after "
                f"{self.frames} frames"
            ) from None
        self.frames += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):  # the device may be gone already
                self.cam.close()


class PreviewSink(Sink):
    """Frames in an OpenCV window (needs a display and a non-headless OpenCV). Esc or q closes it,
    which sets `stop_requested`."""

    @staticmethod
    def check_available() -> None:
        import os
        import sys

        if sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        ):
            raise InputError(
                "--preview needs a display (DISPLAY is not set); use --virtualcam, "
                "--out OUT.mp4 or --null"
            )
        try:
            import cv2
        except ImportError:
            raise InputError("--preview needs OpenCV: pip install opencv-python") from None
        info = cv2.getBuildInformation()
        gui = next((ln for ln in info.splitlines() if ln.strip().startswith("GUI:")), "")
        if "NONE" in gui.upper():
            raise InputError(
                "--preview needs OpenCV with window support; the headless build has none: "
                "pip install opencv-python (or use --virtualcam / --out)"
            )

    def __init__(self, title: str = "edgetalk", scale: int = 2):
        self.check_available()
        import cv2

        self.cv2 = cv2
        self.title = title
        self.scale = max(1, int(scale))
        self.frames = 0
        self.stop_requested = False
        try:
            cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)
        except cv2.error as e:
            raise InputError(f"cannot open a preview window: {e}") from None

    def write(self, frame: Frame) -> None:
        cv2 = self.cv2
        bgr = np.ascontiguousarray(frame.rgb[..., ::-1])
        if self.scale > 1:
            bgr = cv2.resize(
                bgr, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_LINEAR
            )
        cv2.imshow(self.title, bgr)
        key = cv2.waitKey(1) & 0xFF
        self.frames += 1
        if key in (27, ord("q")) or cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            self.stop_requested = True

    def close(self) -> None:
        try:
            self.cv2.destroyWindow(self.title)
            self.cv2.waitKey(1)
        except Exception:
            pass
