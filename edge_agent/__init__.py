"""edge-agent: small language models for IoT fleets, serving classify and extract jobs over MQTT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"
