"""The virtio-net RSS and hash-report specification as pure Python: the reference model."""

from vnetbackend.rss.config import InvalidRssConfig, RssConfig, Steering
from vnetbackend.rss.frame import ParsedFrame, parse_frame, select_hash_input
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
    "parse_frame",
    "parse_hash_types",
    "select_hash_input",
    "toeplitz",
    "toeplitz_bitwise",
]
