"""The CNI spec library: environment, config, results, errors, dispatch and delegation.

Everything under cni/ is on the pod start-up path, so modules import only the
standard library's C-level pieces they need (see docs/decisions.md, "hot path").
"""
