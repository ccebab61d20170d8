# llama.cpp without its extra CPU buffer types (AMX tiles, repacked weights), for the tests
# that use it as a reference. On a VM that reports AMX (seen: an Intel Xeon with amx_int8),
# llama.cpp 0.3.36's extra buffer types crash in the first decode (SIGSEGV); the plain CPU
# path computes the same results.
#   import llamacpp_plain                          (before a Llama is built), or
#   python llamacpp_plain.py MODULE ARGS...        (runs MODULE as __main__, e.g. llama_cpp.server)
import runpy
import sys

import llama_cpp.llama_cpp as _c

_default = _c.llama_model_default_params


def _plain():
    p = _default()
    p.use_extra_bufts = False
    return p


_c.llama_model_default_params = _plain

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
