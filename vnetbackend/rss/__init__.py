"""The virtio-net RSS and hash-report specification as pure Python: the reference model."""

from vnetbackend.rss.config import InvalidRssConfig, RssConfig, Steering, rss_view
from vnetbackend.rss.frame import (
    ETH_HEADER_LEN,
    ParsedFrame,
    outer_ethertype,
    parse_frame,
    select_hash_input,
)
from vnetbackend.rss.toeplitz import build_tables, toeplitz, toeplitz_bitwise
from vnetbackend.rss.types import (
    ALL_HASH_TYPES,
    MAX_HASH_INPUT,
    MAX_KEY_SIZE,
    MAX_QUEUES,
    MAX_TABLE_LENGTH,
    HashReport,
    HashType,
    format_hash_types,
    parse_hash_types,
)

__all__ = [
    "ALL_HASH_TYPES",
    "ETH_HEADER_LEN",
    "MAX_HASH_INPUT",
    "MAX_KEY_SIZE",
    "MAX_QUEUES",
    "MAX_TABLE_LENGTH",
    "HashReport",
    "HashType",
    "InvalidRssConfig",
    "ParsedFrame",
    "RssConfig",
    "Steering",
    "build_tables",
    "format_hash_types",
    "outer_ethertype",
    "parse_frame",
    "parse_hash_types",
    "rss_view",
    "select_hash_input",
    "toeplitz",
    "toeplitz_bitwise",
]
