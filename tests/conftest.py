"""Shared test settings: CPU only, quiet logs, and one persistent XLA compilation cache for
the whole session.

Many tests compile the same programs (the same preset in several CLI runs, subprocesses
that resume a run): JAX's persistent cache lets the second compile of an identical program
load the first one's executable from disk. The cache lives in a temporary folder made for
this session and removed at its end, so a run never reads executables of another version;
set ``JAX_COMPILATION_CACHE_DIR`` yourself to keep one between runs. Subprocesses started
by tests inherit the variables and share the folder. Compile counts in
``tests/test_compiles.py`` are unaffected: JAX's compile event covers a cache hit too."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="metajax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
# Programs that compile in under 0.1 s are cheaper to compile again than to read back.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
