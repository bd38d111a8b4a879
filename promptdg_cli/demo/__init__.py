"""Offline demo assets for promptdg: a generated multi-domain digits world (see world.py).

``BUILD_THREADS``: the demo CLIP (``pretrain.py``) and the demo LDM (``ldm.py``) are always trained
with this many torch threads, whatever the calling process uses. A CPU build's weights depend on the
thread count (the order of its float sums), and every demo number depends on the two models, so
without it ``make demo`` (two threads), ``make claims`` (one thread per arm) and a machine with more
cores would each build other models and print other tables than docs/demo.md's. Two is the thread
count those tables were built with (a 2-core machine). Other CPU kinds (AVX2 against
AVX-512 kernels) or torch builds can still give other bits.
"""

BUILD_THREADS = 2
