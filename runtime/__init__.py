"""fsc.runtime: what rewritten graphs and training loops call at run time.

Planned (DESIGN.md): the copy-engine all-to-all ops and their transports, the
load balancer, and the bubble meter. Nothing is implemented here yet; the compiler
does not emit calls into this package until it is.
"""
