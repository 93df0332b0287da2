"""Synthetic speech with phoneme timings: espeak-ng through ctypes, resampled to 16 kHz.

espeak-ng is the one offline speech source with many voices and languages, and its phoneme events
give exact timings, which the viseme model needs. The command-line tool prints phonemes but not
their times, so the library is driven directly.

espeak keeps state across utterances inside one process (its pitch "flutter" counter and wave
phase run on), so the same text comes out slightly different each call. To make clips exactly
reproducible, a small helper process initialises espeak once and forks a fresh child for every
utterance: each child starts from the same pristine state. The helper imports nothing heavy,
so forking it is cheap and safe even when the caller runs threads (torch, mediapipe).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000

_HELPER = r"""
import ctypes, json, os, struct, sys
lib = ctypes.CDLL(sys.argv[1])
class EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]
class Event(ctypes.Structure):  # espeak_EVENT (speak_lib.h)
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", EventId)]
CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                      ctypes.POINTER(Event))
pcm, events = bytearray(), []
def on_synth(wav, n, ev):
    if n > 0 and wav:
        pcm.extend(ctypes.string_at(wav, 2 * n))
    i = 0
    while ev[i].type != 0:  # LIST_TERMINATED
        if ev[i].type == 7:  # PHONEME: IPA name in id.string, time in ms
            events.append((ev[i].id.string.decode("utf-8", "replace"), ev[i].audio_position))
        elif ev[i].type == 5:  # END
            events.append(("", ev[i].audio_position))
        i += 1
    return 0
cb = CB(on_synth)
# AUDIO_OUTPUT_SYNCHRONOUS=2; options: phoneme events (0x1) with IPA names (0x2)
rate = lib.espeak_Initialize(2, 0, None, 0x1 | 0x2)
lib.espeak_SetSynthCallback(cb)
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                             ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
out = sys.stdout.buffer
def reply(meta, data=b""):
    meta = json.dumps(meta).encode()
    out.write(struct.pack("<II", len(meta), len(data)) + meta + bytes(data))
    out.flush()
reply({"rate": rate})
for line in sys.stdin.buffer:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            if lib.espeak_SetVoiceByName(req["voice"].encode()) != 0:
                reply({"error": "no voice " + req["voice"]})
            else:
                for key, val in ((1, req["rate"]), (3, req["pitch"]), (4, req["range"]), (2, 100)):
                    lib.espeak_SetParameter(key, int(val), 0)  # RATE, PITCH, RANGE, VOLUME
                buf = ctypes.create_string_buffer(req["text"].encode("utf-8"))
                err = lib.espeak_Synth(buf, len(buf), 0, 1, 0, 1, None, None)  # chars, UTF-8
                lib.espeak_Synchronize()
                reply({"events": events, "err": err}, pcm)
        except BaseException as e:
            reply({"error": repr(e)})
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        reply({"error": "espeak child died with status %d" % status})
"""


@dataclass(frozen=True)
class Voice:
    name: str  # espeak voice, optionally with a +variant ("en-us+f3")
    rate: int = 170  # words per minute
    pitch: int = 50  # 0..100
    range: int = 50  # pitch range 0..100


@dataclass
class Utterance:
    audio: np.ndarray  # float32 mono, SAMPLE_RATE
    phonemes: list[tuple[str, float, float]]  # (IPA, start_s, end_s), pauses dropped
    text: str
    voice: Voice


class SpeechUnavailable(RuntimeError):
    pass


def _find_lib() -> str | None:
    for cand in ("libespeak-ng.so.1", ctypes.util.find_library("espeak-ng")):
        if not cand:
            continue
        try:
            ctypes.CDLL(cand)
            return cand
        except OSError:
            continue
    return None


def available() -> bool:
    return _find_lib() is not None


class _Engine:
    """The helper process, started on first use; one request at a time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.pid = None  # a forked caller (a data-loader worker) needs its own helper
        self.rate = 0

    def _read(self):
        head = self.proc.stdout.read(8)
        if len(head) < 8:
            raise SpeechUnavailable("the espeak helper process exited")
        n_meta, n_data = struct.unpack("<II", head)
        meta = json.loads(self.proc.stdout.read(n_meta))
        return meta, self.proc.stdout.read(n_data)

    def _start(self):
        lib = _find_lib()
        if lib is None:
            raise SpeechUnavailable("libespeak-ng.so.1 not found (apt-get install espeak-ng)")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HELPER, lib], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        meta, _ = self._read()
        if meta.get("rate", 0) <= 0:
            raise SpeechUnavailable(f"espeak_Initialize failed ({meta})")
        self.rate = meta["rate"]
        self.pid = os.getpid()

    def synth(self, text: str, voice: Voice) -> tuple[np.ndarray, list, int]:
        req = {
            "text": text,
            "voice": voice.name,
            "rate": voice.rate,
            "pitch": voice.pitch,
            "range": voice.range,
        }
        with self.lock:
            if self.proc is None or self.pid != os.getpid() or self.proc.poll() is not None:
                self._start()
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
            meta, data = self._read()
        if "error" in meta:
            if meta["error"].startswith("no voice"):
                raise ValueError(f"espeak-ng has no voice {voice.name!r}")
            raise RuntimeError(f"espeak failed: {meta['error']}")
        if meta["err"] != 0:
            raise RuntimeError(f"espeak_Synth failed ({meta['err']})")
        pcm = np.frombuffer(data, np.int16).astype(np.float32) / 32768.0
        return pcm, [tuple(e) for e in meta["events"]], self.rate


_ENGINE = _Engine()


def synthesize(text: str, voice: Voice) -> Utterance:
    """Speak text with voice -> 16 kHz float32 audio and (IPA, start_s, end_s) phoneme spans.
    Deterministic: the same text and voice give the same samples in any process."""
    import soxr

    pcm, events, rate = _ENGINE.synth(text, voice)
    audio = soxr.resample(pcm, rate, SAMPLE_RATE).astype(np.float32) if len(pcm) else pcm
    total_s = len(audio) / SAMPLE_RATE
    return Utterance(audio, _spans(events, total_s), text, voice)


def _spans(events: list[tuple[str, int]], total_s: float) -> list[tuple[str, float, float]]:
    """Phoneme events mark starts; each phoneme ends where the next event (or the audio) starts."""
    out = []
    for k, (ipa, ms) in enumerate(events):
        end_ms = events[k + 1][1] if k + 1 < len(events) else total_s * 1000.0
        ipa = ipa.strip()
        # Pauses come as "_" or empty names and language switches as "(en)"; silence is implied
        # by the gaps between phonemes.
        if not ipa or ipa[0] in "_(" or end_ms <= ms:
            continue
        out.append((ipa, ms / 1000.0, min(end_ms, total_s * 1000.0) / 1000.0))
    return out


# ---- voices: a fixed split so evaluation hears voices (and a language) training never did ----

# Names are espeak voice file names ("en" is British English, "fr" French of France).
_TRAIN_BASE = ("en-us", "en", "en-gb-x-rp", "en-029", "de", "fr", "es", "nl")
_TRAIN_VARIANTS = ("", "+m1", "+m3", "+f2", "+f3", "+m5", "+f5", "+michel", "+paul", "+steph")
_EVAL_VOICES = ("en-us+f4", "en-gb-scotland+m7", "en-us-nyc", "it", "it+f4")


def voices(split: str) -> list[str]:
    """Voice names for a split. Eval holds out variants, accents and Italian."""
    if split == "train":
        return [b + v for b in _TRAIN_BASE for v in _TRAIN_VARIANTS]
    if split == "eval":
        return list(_EVAL_VOICES)
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")


def random_voice(rng: np.random.Generator, split: str, exclude: str | None = None) -> Voice:
    names = [n for n in voices(split) if n != exclude]
    name = names[int(rng.integers(len(names)))]
    return Voice(
        name,
        rate=int(rng.integers(135, 215)),
        pitch=int(rng.integers(30, 75)),
        range=int(rng.integers(30, 80)),
    )


def language(voice_name: str) -> str:
    return voice_name.split("+")[0].split("-")[0]


# ---- text: varied sentences per language, deterministic for a Generator ----


def _w(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_EN = {
    "{d}": _w("the a my your our this that every some one"),
    "{a}": _w(
        "big small old new good bad quick slow happy tired blue green warm cold bright quiet famous "
        "empty heavy pretty"
    ),
    "{n}": _w(
        "man woman child friend teacher doctor dog cat bird house garden river city road window "
        "morning weekend book letter phone music coffee bread apple paper picture problem idea story "
        "answer question market mother father boat machine"
    ),
    "{V}": _w(
        "sees likes wants finds brings opens moves keeps makes takes gives reads writes buys sells "
        "builds paints shows fixes misses watches meets"
    ),
    "{v}": _w("see like want find bring open move keep make take give read write buy sell"),
    "{t}": _w("morning evening week summer Monday night"),
    "{day}": _w("Monday Tuesday Wednesday Thursday Friday Saturday Sunday"),
    "{num}": _w("two three four seven ten twelve forty"),
}
_WORDS = {
    "de": _w(
        "der die das ein eine mein dein unser heute morgen immer nie sehr gut schlecht gross klein "
        "alt neu schnell langsam warm kalt Mann Frau Kind Freund Haus Garten Stadt Strasse Fenster "
        "Buch Brief Musik Kaffee Brot Apfel Wetter sieht macht findet bringt schreibt liest kauft "
        "baut zeigt wohnt spielt arbeitet lacht wartet"
    ),
    "fr": _w(
        "le la les un une mon ton notre aujourd'hui demain toujours jamais très bon mauvais grand "
        "petit vieux nouveau rapide lent chaud froid homme femme enfant ami maison jardin ville rue "
        "fenêtre livre lettre musique café pain pomme temps voit fait trouve apporte écrit lit achète "
        "construit montre habite joue travaille rit attend"
    ),
    "es": _w(
        "el la los las un una mi tu nuestro hoy mañana siempre nunca muy bueno malo grande pequeño "
        "viejo nuevo rápido lento caliente frío hombre mujer niño amigo casa jardín ciudad calle "
        "ventana libro carta música café pan manzana tiempo ve hace encuentra trae escribe lee compra "
        "construye muestra vive juega trabaja ríe espera"
    ),
    "nl": _w(
        "de het een mijn jouw onze vandaag morgen altijd nooit heel goed slecht groot klein oud nieuw "
        "snel langzaam warm koud man vrouw kind vriend huis tuin stad straat raam boek brief muziek "
        "koffie brood appel weer ziet maakt vindt brengt schrijft leest koopt bouwt toont woont "
        "speelt werkt lacht wacht"
    ),
    "it": _w(
        "il la lo un una mio tuo nostro oggi domani sempre mai molto buono cattivo grande piccolo "
        "vecchio nuovo veloce lento caldo freddo uomo donna bambino amico casa giardino città strada "
        "finestra libro lettera musica caffè pane mela tempo vede fa trova porta scrive legge compra "
        "costruisce mostra abita gioca lavora ride aspetta"
    ),
}

_EN_TEMPLATES = (
    "{d} {a} {n} {V} {d} {n}.",
    "Why does {d} {n} {v} {d} {a} {n}?",
    "I think {d} {a} {n} {V} {d} {n} every {t}.",
    "Please bring {d} {n} to the {n} before {t}.",
    "We met {num} {a} people near the {n}, and it was {a}.",
    "Maybe {d} {n} will call back on {day}.",
    "The {n} was {a}, but the {n} looked {a}.",
    "Can you believe {d} {n} {V} {d} {a} {n}?",
    "Bob, Pam and Mike made {num} maps of the {n}.",
    "Five very fine photos of a {a} {n} arrived on {day}.",
    "Oh, you {v} the {n}? Well, I {v} {d} {a} {n} too.",
    "From {day} to {day}, {d} {n} {V} {num} {a} {n}s.",
)


def random_sentence(rng: np.random.Generator, lang: str = "en") -> str:
    """A varied sentence. English uses templates (rich bilabials and labiodentals); other
    languages string common words together, which still gives natural phoneme statistics."""

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    if lang not in _WORDS:  # English, and the fallback for languages without a word list
        out = pick(_EN_TEMPLATES)
        for key, src in _EN.items():
            while key in out:
                out = out.replace(key, pick(src), 1)
        return out[0].upper() + out[1:]
    words = _WORDS[lang]
    n = int(rng.integers(4, 11))
    text = " ".join(pick(words) for _ in range(n))
    return text[0].upper() + text[1:] + pick((".", ".", "?", "!"))


_SHORT = {
    "en": (
        "Yes, I see.",
        "Oh, really?",
        "Maybe.",
        "I know.",
        "Okay, fine.",
        "Right, but why?",
        "Sure!",
        "Not bad.",
        "Well, perhaps.",
        "Me too.",
    ),
    "de": ("Ja, genau.", "Wirklich?", "Na gut.", "Vielleicht.", "Ich weiss.", "Warum?"),
    "fr": ("Oui, bien sûr.", "Vraiment?", "Peut-être.", "D'accord.", "Pourquoi?", "Moi aussi."),
    "es": ("Sí, claro.", "¿De verdad?", "Quizás.", "Vale.", "¿Por qué?", "Yo también."),
    "nl": ("Ja, precies.", "Echt waar?", "Misschien.", "Oké.", "Waarom?", "Ik ook."),
    "it": ("Sì, certo.", "Davvero?", "Forse.", "Va bene.", "Perché?", "Anch'io."),
}


def random_utterance(rng: np.random.Generator, voice: Voice, max_seconds: float = 6.0) -> Utterance:
    """One sentence in voice's language, re-drawn (a few times) if it runs past max_seconds;
    short budgets get a short reply ("Oh, really?")."""
    lang = language(voice.name)
    replies = _SHORT.get(lang, _SHORT["en"])
    for i in range(4):
        short = max_seconds < 2.0 or i == 3
        text = replies[int(rng.integers(len(replies)))] if short else random_sentence(rng, lang)
        utt = synthesize(text, voice)
        if len(utt.audio) <= max_seconds * SAMPLE_RATE:
            return utt
    return utt
