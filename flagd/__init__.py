"""flagd: classify encrypted traffic flows with FLAG, live or from captures."""

__version__ = "0.1.0"
