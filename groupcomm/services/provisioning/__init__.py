"""Provisioning: bundles and configuration on groups of nodes, and deployment plans (issue 12).

The guide is ``docs/provisioning.rst``.  One line per module, bottom up.

Bundles on one node (blocking, no trio):

* :mod:`.bundle` -- the artifact: a wheel or a ``.tar.gz`` carrying a
  ``bundle.toml`` manifest, read safely (``read_bundle``), and the supervisor
  ProcessSpec of an installed copy;
* :mod:`.store` -- the node-local content-addressed store of bundle files
  (``<root>/sha256/<hex>``), with a streaming writer and a byte quota;
* :mod:`.signing` -- Ed25519 signing keys, detached ``FILE.sig`` signatures
  and their verification against trusted public keys;
* :mod:`.environments` -- one isolated environment (a venv) per installed
  bundle version, built atomically and reused when complete;
* :mod:`.configfiles` -- configuration delivered to a started bundle:
  ``GROUPCOMM_CONFIG_FILE`` (TOML) and ``GROUPCOMM_CONFIG_<PID>_<KEY>``
  variables, the process restarted on change.

The replicated state and the decisions (sans-IO, pure or fed in order):

* :mod:`.ops` -- the operations on a group's desired state and on the
  deployment-plan record, one validating decoder;
* :mod:`.state` -- ``GroupState`` (the pure desired state), ``GroupReplica``
  (operations accepted only where delivered in a regular primary configuration,
  rejected read-only elsewhere; state transfer; cold-start adoption) and its
  SQLite store;
* :mod:`.policy` -- sync policies: per group and kind, ``cluster`` / ``node`` /
  ``disabled`` with inbound and outbound allow/deny lists, over a node-local
  overlay;
* :mod:`.reconcile` -- desired state of the node's groups against what it
  has: the fetch / install / start / stop / uninstall actions that converge;
* :mod:`.transfer` -- pulling a bundle file from the members that hold it:
  wire schema, ``Server``, ``Puller`` (windowed, verified by SHA-256);
* :mod:`.plan` -- the ``plan.toml`` format (roles, environments, promotion
  gate), its digest, target choice and ``plan diff``;
* :mod:`.rollout` -- the replicated deployment record (``PlansState``), what
  each node wants from it, and the driver (batches, health, rollback);
* :mod:`.status` -- what each node publishes about itself (its actual rows)
  and the board of every node's last status;
* :mod:`.overview` -- the views the API shows: bundles per group, the cluster
  overview, the audit log;
* :mod:`.node_core` -- ``ProvisioningCore``: one node's replicas, plan record,
  statuses and sync policy, fed in delivery order, answering with actions.

Driving it (trio) and its shells:

* :mod:`.fetching` -- ``ChannelPuller`` and ``serve_blobs``: the transfer over
  a channel or space;
* :mod:`.executor` -- ``Executor``: carries out the reconciler's actions with
  the store, the environments and a running supervisor;
* :mod:`.node` -- ``ProvisioningNode``, the agent and its Python API;
* :mod:`.settings` -- the node file's ``[provisioning]`` table;
* :mod:`.control` -- the agent's control socket (server and client) that the
  ``groupcomm group|bundle|config|plan|cluster`` commands use;
* :mod:`.render` -- tables, live progress and JSON for those commands;
* :mod:`.sim` -- ``SimProvisioning``: the real core on ``SimCluster`` nodes
  with a fake executor, in virtual time (the property tests).

Nothing is imported here, so importing the package costs nothing and needs
neither trio nor cryptography.
"""
