"""hotsup's worker side: the zygote, the worker runtime and the wire protocol.

Nothing here imports ``hotsup.supervisor``, so a worker stays lean.
"""
