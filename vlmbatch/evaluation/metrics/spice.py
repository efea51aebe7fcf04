"""SPICE through pycocoevalcap's `spice-1.0.jar`, made to run where pycocoevalcap's own wrapper does not:
- its CoreNLP 3.6.0 download URL is gone: `provision_corenlp` fetches the same jars from Maven Central into
  a cache, and `find_corenlp_jars` looks there, in `$VLMBATCH_CORENLP_DIR` and in `spice/lib`;
- it writes inside its install folder, which may be read-only: here a temporary folder is used;
- the jar finds CoreNLP through its manifest's class path: an explicit class path is passed instead;
- Java 15 removed the JavaScript engine the jar prints with: the standalone Nashorn is added, and the
  parse cache's serializer gets the `--add-opens` it needs on Java 9+.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from vlmbatch.errors import VlmbatchError

SPICE_MAIN_CLASS = "edu.anu.spice.SpiceScorer"
SPICE_JAR = "spice-1.0.jar"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
CORENLP_URLS = {jar: f"{MAVEN_CENTRAL}/edu/stanford/nlp/stanford-corenlp/3.6.0/{jar}" for jar in CORENLP_JARS}
#: Nashorn 15.4 and the ASM libraries it depends on, for Java 15+ (which has no JavaScript engine).
NASHORN_URLS = {
    "nashorn-core-15.4.jar": f"{MAVEN_CENTRAL}/org/openjdk/nashorn/nashorn-core/15.4/nashorn-core-15.4.jar",
    **{f"{name}-7.3.1.jar": f"{MAVEN_CENTRAL}/org/ow2/asm/{name}/7.3.1/{name}-7.3.1.jar"
       for name in ("asm", "asm-commons", "asm-tree", "asm-util", "asm-analysis")},
}
#: Packages the parse cache's serializer (FST) reflects into; closed by default since Java 9 (16 enforces).
#: Passed on every Java 9+ run: they cost nothing when `-cache` is not used.
ADD_OPENS_PACKAGES = ("java.lang", "java.math", "java.util", "java.util.concurrent", "java.net", "java.text")
FIRST_JAVA_WITHOUT_JAVASCRIPT = 15
CORENLP_DIR_ENV = "VLMBATCH_CORENLP_DIR"
PROVISION_HINT = f"run `vlmbatch eval --provision-spice` or set {CORENLP_DIR_ENV}"

Fetch = Callable[[str, Path], None]


class SpiceUnavailable(VlmbatchError):
    """SPICE cannot run here; the message says why in one line. Callers usually report it and go on."""


def pycocoevalcap_spice_dir() -> Path:
    """The `spice` folder of the installed pycocoevalcap (holds the jar and its bundled libraries)."""
    spec = find_spec("pycocoevalcap.spice")
    if spec is None or not spec.submodule_search_locations:
        raise SpiceUnavailable("SPICE skipped: pycocoevalcap is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def default_cache_dir() -> Path:
    """Where `provision_corenlp` puts the jars unless told otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vlmbatch" / "corenlp"


def default_search_dirs() -> list[Path]:
    """Folders searched for the extra jars, in order: $VLMBATCH_CORENLP_DIR, the cache, pycocoevalcap's lib."""
    dirs = [Path(os.environ[CORENLP_DIR_ENV])] if os.environ.get(CORENLP_DIR_ENV) else []
    dirs.append(default_cache_dir())
    with suppress(SpiceUnavailable):
        dirs.append(pycocoevalcap_spice_dir() / "lib")
    return dirs


def _find_all(names: Sequence[str], search: Sequence[Path]) -> list[Path] | None:
    """The first folder of `search` holding every one of `names`, as paths; None when none does."""
    for folder in search:
        paths = [Path(folder) / name for name in names]
        if all(path.is_file() for path in paths):
            return paths
    return None


def find_corenlp_jars(search: Sequence[Path] | None = None) -> list[Path] | None:
    """Paths of the two CoreNLP 3.6.0 jars from the first folder that has both, or None."""
    return _find_all(CORENLP_JARS, default_search_dirs() if search is None else search)


def find_nashorn_jars(search: Sequence[Path] | None = None) -> list[Path] | None:
    """Paths of Nashorn and its ASM jars from the first folder that has them all, or None."""
    return _find_all(list(NASHORN_URLS), default_search_dirs() if search is None else search)


def _download(url: str, dest: Path) -> None:
    """Fetch `url` to `dest` atomically, so an interrupted download never looks like a jar."""
    partial = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)
    partial.replace(dest)


def provision_corenlp(dest: Path | None = None, *, nashorn: bool = True, fetch: Fetch = _download) -> Path:
    """Download the CoreNLP 3.6.0 jars (and, with `nashorn`, Nashorn for Java 15+) from Maven Central.

    Jars already present are kept. Returns the folder, which `find_corenlp_jars` searches by default when it
    is the default cache. Raises `VlmbatchError` with one line when the download fails (e.g. offline).
    """
    dest = Path(dest) if dest is not None else default_cache_dir()
    wanted = dict(CORENLP_URLS, **(NASHORN_URLS if nashorn else {}))
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VlmbatchError(f"cannot create {dest} for the SPICE jars: {exc.strerror or exc}") from None
    for name, url in wanted.items():
        if (dest / name).is_file():
            continue
        try:
            fetch(url, dest / name)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise VlmbatchError(
                f"could not download {name} from Maven Central ({reason}); are you offline? "
                f"Put the jars in {dest} or set {CORENLP_DIR_ENV} to a folder that has them"
            ) from None
    return dest


# --- Java ---------------------------------------------------------------------------------------------

_VERSION_IN_QUOTES = re.compile(r'version "([^"]+)"')


def parse_java_version(text: str) -> int:
    """Major version from `java -version` output: "1.8.0_392" -> 8, "17.0.15" -> 17, "21" -> 21, "9-ea" -> 9."""
    found = _VERSION_IN_QUOTES.search(text)
    if not found:
        raise ValueError(f"no Java version in {text.strip()[:80]!r}")
    parts = re.split(r"[.\-+_]", found.group(1))
    major = int(parts[1]) if parts[0] == "1" and len(parts) > 1 else int(parts[0])
    return major


def java_major_version(java: str = "java") -> int:
    """Major version of the given Java executable; SpiceUnavailable when it is missing or unreadable."""
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
        return parse_java_version(done.stderr + done.stdout)
    except FileNotFoundError:
        raise SpiceUnavailable(f"SPICE skipped: Java not found ({java!r} is not on PATH)") from None
    except (ValueError, subprocess.SubprocessError) as exc:
        raise SpiceUnavailable(f"SPICE skipped: could not read the version of {java!r} ({exc})") from None


# --- Running SPICE ------------------------------------------------------------------------------------


@dataclass
class SpiceResult:
    """SPICE F-scores: the corpus score (mean of per-image "All" F, as pycocoevalcap reports it), the per-image
    F in input order, and every image's full score dict (All, Object, Attribute, ... -> f, pr, re, ...).
    """

    score: float
    per_item: list[float]
    details: list[dict[str, dict[str, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class SpiceRunner:
    """Runs `spice-1.0.jar` with an explicit class path, temp files in a writable folder.

    `classpath` is the SPICE jar, its bundled libraries, CoreNLP and (Java 15+) Nashorn. `cache_dir`, when
    set, is passed as `-cache` so reference parses are reused between runs.
    """

    classpath: tuple[Path, ...]
    java: str = "java"
    java_version: int = 8
    cache_dir: Path | None = None
    memory: str = "8G"
    threads: int | None = None

    @classmethod
    def locate(cls, search: Sequence[Path] | None = None, *, java: str = "java",
               cache_dir: Path | None = None, threads: int | None = None) -> SpiceRunner:
        """Find everything SPICE needs; SpiceUnavailable with a one-line reason when something is missing."""
        search = default_search_dirs() if search is None else list(search)
        spice_dir = pycocoevalcap_spice_dir()
        corenlp = find_corenlp_jars(search)
        if corenlp is None:
            where = ", ".join(str(folder) for folder in search) or "(no folders)"
            raise SpiceUnavailable(
                f"SPICE skipped: Stanford CoreNLP 3.6.0 jars not found in {where}; {PROVISION_HINT}")
        version = java_major_version(java)
        extra: list[Path] = []
        if version >= FIRST_JAVA_WITHOUT_JAVASCRIPT:
            nashorn = find_nashorn_jars(search)
            if nashorn is None:
                raise SpiceUnavailable(
                    f"SPICE skipped: Java {version} has no JavaScript engine, which spice-1.0.jar needs to "
                    f"write its results, and the Nashorn jars were not found; {PROVISION_HINT}")
            extra = nashorn
        bundled = sorted((spice_dir / "lib").glob("*.jar"))
        classpath = (spice_dir / SPICE_JAR, *corenlp, *bundled, *extra)
        return cls(classpath=tuple(dict.fromkeys(classpath)), java=java, java_version=version,
                   cache_dir=cache_dir, threads=threads)

    def command(self, input_path: Path, output_path: Path) -> list[str]:
        """The Java command line scoring `input_path` into `output_path`."""
        cmd = [self.java, f"-Xmx{self.memory}"]
        if self.java_version >= 9:  # harmless without -cache, needed with it
            for package in ADD_OPENS_PACKAGES:
                cmd += ["--add-opens", f"java.base/{package}=ALL-UNNAMED"]
        cmd += ["-cp", os.pathsep.join(str(path) for path in self.classpath), SPICE_MAIN_CLASS,
                str(input_path), "-out", str(output_path), "-subset", "-silent"]
        if self.cache_dir is not None:
            cmd += ["-cache", str(self.cache_dir)]
        if self.threads is not None:
            cmd += ["-threads", str(self.threads)]
        return cmd

    def score(self, references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> SpiceResult:
        """SPICE of each prediction against its references (pycocoevalcap feeds it PTB-tokenized text)."""
        ids = list(predictions)
        if self.cache_dir is not None:
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="vlmbatch-spice-") as tmp:
            input_path, output_path = Path(tmp) / "input.json", Path(tmp) / "output.json"
            write_spice_input(input_path, references, predictions)
            done = subprocess.run(self.command(input_path, output_path), cwd=tmp, capture_output=True,
                                  text=True, errors="replace")
            if done.returncode != 0 or not output_path.is_file():
                reason = _failure_line(done.stderr + done.stdout)
                raise VlmbatchError(f"SPICE failed (exit {done.returncode}): {reason}")
            return read_spice_output(output_path, ids)


def _failure_line(output: str) -> str:
    """The line of a Java failure worth showing: the first exception or error, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return next((line for line in lines if "Exception" in line or "Error" in line), lines[-1] if lines else "no output")


def write_spice_input(path: Path, references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> None:
    """SPICE's input file: a JSON list of {"image_id", "test": prediction, "refs": [references]}."""
    rows = [{"image_id": image_id, "test": caption, "refs": list(references[image_id])}
            for image_id, caption in predictions.items()]
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")


def _as_float(value: object) -> float:
    """SPICE writes NaN as JSON null (e.g. a subset with no reference tuples); pycocoevalcap reads it as NaN."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def read_spice_output(path: Path, ids: Sequence[str]) -> SpiceResult:
    """Parse SPICE's `-out` file: a JSON list of {"image_id", "scores": {"All": {"f", "pr", "re", ...}, ...}}."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    by_id = {str(row["image_id"]): row["scores"] for row in rows}
    missing = [image_id for image_id in ids if image_id not in by_id]
    if missing:
        raise VlmbatchError(f"SPICE output lacks {len(missing)} of {len(ids)} images (first: {missing[0]})")
    details = [{subset: {key: _as_float(value) for key, value in numbers.items()}
                for subset, numbers in by_id[image_id].items()} for image_id in ids]
    per_item = [detail["All"]["f"] for detail in details]
    # The corpus score is pycocoevalcap's: np.mean of the per-image "All" F (never NaN; subsets may be).
    return SpiceResult(score=float(np.mean(per_item)), per_item=per_item, details=details)
