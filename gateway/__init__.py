"""presence-gateway: a Pusher-compatible WebSocket gateway with verified, sharded presence."""

__all__ = ["__version__"]

__version__ = "0.1.0"
