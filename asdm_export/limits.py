"""The bounds on values users give: one set for the command line, the Python API and the server's requests.

Each bound is where a larger value stops meaning something (a seed's bits the generator ignores) or starts to
break something (a thread count no process can start), not a matter of taste.
"""

# torch's CPU generator (mt19937) keeps the low 32 bits of a seed: 0 and 2**32 give the same noise, so a
# wider range would give two seeds one image. numpy's legacy RandomState takes the same range.
SEED_MAX = 2**32 - 1
# A classifier-free guidance scale; 1 or less turns guidance off. Above 100 the prediction is noise (1e38
# gave a black image).
GUIDANCE_MAX = 100.0
# CPU threads a command or server takes: above any CPU's cores, below what a process can start (a server
# given 100000 lost its model instance to std::bad_alloc).
THREADS_MAX = 1024
# Model instances a server or deployment starts per device: each runs on at least one thread.
INSTANCES_MAX = THREADS_MAX
# Seconds a stopping server may take to finish its requests: a day (Triton's flag is a 32-bit int).
EXIT_TIMEOUT_MAX = 86_400
