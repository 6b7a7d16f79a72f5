"""The pure core: every decision as values in, values out; no I/O, clocks or event loop.

Policy, lifecycle, limits and message rewriting live here (DESIGN §2).
"""
