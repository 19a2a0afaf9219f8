"""Provisioning: bundles installed and started on groups of nodes (issue 12).

The leaf pieces about bundles (blocking, no trio):

* :mod:`.bundle` -- the artifact: a wheel or a ``.tar.gz`` carrying a
  ``bundle.toml`` manifest, read safely (``read_bundle``), and the supervisor
  ProcessSpec of an installed copy;
* :mod:`.store` -- the node-local content-addressed store of bundle files
  (``<root>/sha256/<hex>``), with a streaming writer and a byte quota;
* :mod:`.signing` -- Ed25519 signing keys, detached ``FILE.sig`` signatures
  and their verification against trusted public keys;
* :mod:`.environments` -- one isolated environment (a venv) per installed
  bundle version, built atomically and reused when complete.

The replicated desired state of a group (sans-IO):

* :mod:`.ops` -- the operations on a group's desired state (install,
  uninstall, start, stop, set and delete configuration), one validating decoder;
* :mod:`.state` -- ``GroupState`` (the pure desired state), ``GroupReplica``
  (operations accepted only where delivered in a regular primary configuration,
  rejected read-only elsewhere; state transfer) and its SQLite store;
* :mod:`.reconcile` -- desired state of the node's groups against what it
  has: the fetch / install / start / stop / uninstall actions that converge;
* :mod:`.transfer` -- pulling a bundle file from the members that hold it:
  wire schema, ``Server``, ``Puller`` (windowed, verified by SHA-256).

Nothing is imported here, so importing the package costs nothing and needs
neither trio nor cryptography.
"""
