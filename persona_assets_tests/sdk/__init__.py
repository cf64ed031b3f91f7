"""The real `persona serve` the server and SDK tests talk to, and the pages and scripts the SDKs run in."""
