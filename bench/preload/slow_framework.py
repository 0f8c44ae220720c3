"""A stand-in for a heavy web framework: importing it takes 0.3 s.

The slow-import variant of the benchmark app imports it. hotsup lists it in
``preload`` so its zygote pays this once; a peer that restarts a process pays
it on every reload. It sleeps rather than computes so the cost does not depend
on how busy the machine is. This directory is put on PYTHONPATH by the bench.
"""

import time

IMPORT_SECONDS = 0.3

time.sleep(IMPORT_SECONDS)
