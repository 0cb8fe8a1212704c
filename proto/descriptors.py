"""The descriptor pool the aet.proto stubs register in, apart from protobuf's default pool.

Our KServe messages and service live in package `inference`, as Triton's do, so that
`tritonclient` and `perf_analyzer` speak to the server unchanged. `tritonclient.grpc`
registers its own copy of those symbols in protobuf's default pool; two files defining
`inference.DataType` in one pool is an error, whichever is imported first. The stubs of
this package therefore register in `POOL` (`python -m aet.proto.generate` writes them so):
both can be imported in one process, in either order. Wire compatibility is unaffected:
messages are matched by field numbers, services by their full name.

`ReflectionPools` lets server reflection find symbols in `POOL` and in the default pool
(where grpc's health and reflection services live).
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()


class ReflectionPools:
    """The `DescriptorPool` lookups server reflection makes, tried in each pool in turn."""

    def __init__(self, *pools: descriptor_pool.DescriptorPool) -> None:
        self._pools = pools or (POOL, descriptor_pool.Default())

    def _first(self, method: str, *args):
        for pool in self._pools[:-1]:
            try:
                return getattr(pool, method)(*args)
            except KeyError:
                continue
        return getattr(self._pools[-1], method)(*args)

    def FindFileByName(self, name):
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol):
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name):
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message_descriptor, number):
        return message_descriptor.file.pool.FindExtensionByNumber(message_descriptor, number)

    def FindAllExtensions(self, message_descriptor):
        return message_descriptor.file.pool.FindAllExtensions(message_descriptor)
