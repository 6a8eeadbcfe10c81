"""What a user meets before any kernel runs: the source distribution carries every file the build
reads, the loader's errors say what to do, and the build embeds PTX for GPUs newer than its
targets. CPU only."""
import importlib.util
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setup_module():
    spec = importlib.util.spec_from_file_location("cuflash_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imported, setup.py defines its helpers and builds nothing
    return module


def test_sdist_manifest_lists_every_build_input(tmp_path):
    # egg_info writes the file list an sdist takes (SOURCES.txt); every tracked header and source
    # under csrc/ and include/, and the kernels' generator, must be in it (without MANIFEST.in the
    # headers were not, and an sdist failed to build).
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    listed = set((tmp_path / "cuflash_attn.egg-info" / "SOURCES.txt").read_text().split())
    tracked = subprocess.run(["git", "ls-files", "csrc", "include", "tools", "README.md"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    assert tracked, "git ls-files listed nothing"
    missing = sorted(set(tracked) - listed)
    assert not missing, missing


def test_gencode_embeds_ptx_of_the_newest_portable_target():
    flags = _setup_module().gencode_flags("8.0;9.0a")
    assert "-gencode=arch=compute_80,code=[sm_80,compute_80]" in flags
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags  # sm_90a's PTX runs on sm_90 only
    assert "-DCUFLASH_SM90A_BUILT" in flags
    assert _setup_module().gencode_flags("8.0,8.6") == ["-gencode=arch=compute_80,code=sm_80",
                                                        "-gencode=arch=compute_86,code=[sm_86,compute_86]"]


def _package_copy(tmp_path, source_tree):
    # The package's Python files without the compiled extension, in a directory of their own.
    package = tmp_path / "cuflash_attn"
    package.mkdir()
    for f in (ROOT / "cuflash_attn").glob("*.py"):
        if f.name != "_build_info.py":
            shutil.copy(f, package)
    if source_tree:
        (tmp_path / "setup.py").write_text("")
    return package


def _import_error(cwd):
    result = subprocess.run([sys.executable, "-c", "import cuflash_attn"], cwd=cwd, capture_output=True, text=True)
    assert result.returncode != 0
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("source_tree", [False, True])
def test_import_without_the_extension_says_how_to_build(tmp_path, source_tree):
    _package_copy(tmp_path, source_tree)
    message = _import_error(tmp_path)
    assert "compiled extension cuflash_attn._C is missing" in message and "scripts/setup.sh" in message, message
    assert ("another directory" in message) == source_tree, message


def test_import_of_an_extension_built_against_another_torch_names_both(tmp_path):
    package = _package_copy(tmp_path, False)
    # An empty library fails to load, as one built against another torch does (undefined symbols).
    (package / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"")
    (package / "_build_info.py").write_text('TORCH_VERSION = "2.0.0"\n')
    message = _import_error(tmp_path)
    assert "built against torch 2.0.0" in message and "pip install --no-build-isolation" in message, message


def test_an_extension_that_fails_to_load_for_another_reason_says_so(tmp_path):
    package = _package_copy(tmp_path, False)
    (package / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"")
    message = _import_error(tmp_path)
    assert "failed to load" in message and "scripts/setup.sh" in message, message


def _call_arguments(text, open_paren):
    """The top-level arguments of the call whose '(' is at text[open_paren], as source strings."""
    args, depth, start, i, in_string = [], 0, open_paren + 1, open_paren + 1, False
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                args.append(text[start:i].strip())
                return args
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    raise AssertionError(f"unbalanced call at offset {open_paren}")


def test_error_messages_format_numbers_without_an_ostream():
    """A number inserted into a TORCH_CHECK message (c10::str, an ostream) crashed the process on an
    H100 host (g++ 13, Ubuntu 24.04's Python; benchmarks/NOTES.md) instead of raising: every message
    argument in csrc must be a string literal, a string or ScalarType variable (one no declaration
    in its file gives a number type), one whole call of num(...) / shape(...) (which format through
    std::to_string), or a tensor's device() / scalar_type() (printed by libc10). (A source check:
    torch's inline headers may still format numbers, as c10::fromIntArrayRefSlow does for sizes below
    -2^62.)"""
    literal = r'("([^"\\]|\\.)*"\s*)+'
    allowed = [
        re.compile(literal),
        re.compile(r"[\w.>-]+(\.|->)(device|scalar_type)\(\)"),
        re.compile(rf"[^?]+\?\s*{literal}\s*:\s*({literal}|[^?]+\?\s*{literal}\s*:\s*{literal})", re.S),
    ]

    def one_formatting_call(arg):  # num(...), shape(...) or cudaGetErrorString(...), nothing after it
        call = re.match(r"(num|shape|cudaGetErrorString)\s*\(", arg)
        return bool(call) and len(_call_arguments(arg, call.end() - 1)[-1]) + call.end() + 1 == len(arg)

    # Macros whose arguments after the first (TORCH_WARN*, c10::str: all of them) become the message.
    macros = r"TORCH_CHECK\w*|TORCH_INTERNAL_ASSERT\w*|TORCH_WARN\w*|c10::str"
    offending = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix not in {".cpp", ".h", ".cu", ".cuh"}:
            continue
        text = path.read_text()
        printable = r"const char\s*\*|std::string(?:_view)?\s*&?|const std::string\s*&|at::ScalarType"
        number = r"\b(?:u?int\w*|size_t|long|short|unsigned|float|double|auto|bool)\s*&?"
        declared_number = set(re.findall(rf"(?:{number})\s+(\w+)\s*[,)=;\[]", text))
        string_names = set(re.findall(rf"(?:{printable})\s*(\w+)\s*[,)=;]", text)) - declared_number
        for call in re.finditer(rf"\b({macros})\s*\(", text):
            args = _call_arguments(text, call.end() - 1)
            whole = call.group(1) == "c10::str" or call.group(1).startswith("TORCH_WARN")
            for arg in args if whole else args[1:]:
                if arg in string_names or one_formatting_call(arg) or any(p.fullmatch(arg) for p in allowed):
                    continue
                line = text.count("\n", 0, call.start()) + 1
                offending.append(f"{path.relative_to(ROOT)}:{line}: {arg}")
    assert not offending, "message arguments that may reach an ostream (wrap numbers in num()):\n" + "\n".join(offending)
