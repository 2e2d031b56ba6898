"""The `wwwserve` command line."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from wwwserve_gateway.config.loading import load_config
from wwwserve_gateway.config.problems import ConfigError
from wwwserve_gateway.config.schema import GatewayConfig

app = typer.Typer(
    help="WWW.Serve gateway: a node of a decentralized LLM serving network.", no_args_is_help=True
)
models_app = typer.Typer(help="Manage GGUF models for the embedded llama.cpp backend.", no_args_is_help=True)
app.add_typer(models_app, name="models")
keys_app = typer.Typer(
    help="The node's identity key (Ed25519); its public key is the node id.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
ledger_app = typer.Typer(
    help="The replicated credit ledger: balances, operations, verification.", no_args_is_help=True
)
app.add_typer(ledger_app, name="ledger")
network_app = typer.Typer(
    help="The network genesis: parameters whose hash is the network id.", no_args_is_help=True
)
app.add_typer(network_app, name="network")
console = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="the node's policy file (YAML)")]


def _load(path: Path) -> GatewayConfig:
    """The config at `path` with every plugin's settings checked; exit 2 naming each bad key."""
    from wwwserve_gateway.plugin_api.loading import check_plugins

    try:
        return load_config(path, checks=(check_plugins,))
    except ConfigError as exc:
        console.print(f"[red]config error[/red] {escape(exc.render())}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def node(
    config: ConfigOption,
    host: Annotated[str | None, typer.Option(help="listen address (overrides node.host)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (overrides node.port)")] = None,
) -> None:
    """Run a node: the OpenAI-compatible gateway in front of this provider's backends."""
    import os

    import structlog
    import uvicorn

    from wwwserve_gateway.datadir import PRIVATE_UMASK, make_private
    from wwwserve_gateway.http.server import ConnectionGuard, HttpLimits
    from wwwserve_gateway.logs import configure_logging
    from wwwserve_gateway.node import Node
    from wwwserve_gateway.overlay.frames import DEFAULT_MAX_FRAME_BYTES

    cfg = _load(config)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if overrides:
        cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update=overrides)})
    settings = cfg.node
    configure_logging(settings.log_level, settings.log_format)
    log = structlog.get_logger("wwwserve_gateway.cli")
    # Node state is private to its user: files the node creates, and the data dir as it finds it.
    os.umask(PRIVATE_UMASK)
    tightened = make_private(settings.data_dir)
    if tightened:
        log.warning(
            "data dir was readable by others; tightened it",
            data_dir=str(settings.data_dir),
            changed=tightened,
        )
    _raise_open_file_limit(settings.max_connections, log)
    # The port first: a busy one must stop the node before it opens its ledger or dials a peer.
    try:
        listening = _bind(settings.host, settings.port)
    except OSError as exc:
        console.print(
            f"[red]cannot start the node:[/red] cannot listen on {settings.host}:{settings.port} "
            f"({exc.strerror}); set node.port (or --port) to a free port, or stop what holds it",
            highlight=False,
        )
        raise typer.Exit(1) from None
    try:
        gateway = Node(cfg, config_path=config)
    except Exception as exc:  # a refused identity key, a tampered ledger, a broken plugin: say which
        console.print(f"[red]cannot start the node:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    limits = HttpLimits(
        settings.max_connections,
        settings.max_connections_per_source,
        settings.header_timeout,
        settings.body_timeout,
    )
    http_protocol, ws_protocol = ConnectionGuard(limits, gateway.metrics.prometheus).protocols()
    server = uvicorn.Server(
        uvicorn.Config(
            gateway.app,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http=http_protocol,  # httptools with connection caps and header/body deadlines
            lifespan="on",
            access_log=False,
            proxy_headers=False,  # the client address is the TCP peer's: per-source caps count it
            ws=ws_protocol,  # websockets-sansio, giving its connection's slot back when it closes
            # The overlay's frame limit: the websocket layer refuses a bigger message (close 1009)
            # before buffering it, and the overlay counts that as `oversized`.
            ws_max_size=DEFAULT_MAX_FRAME_BYTES,
            log_config=None,
            # Longer than clients keep an idle pooled connection (httpx, the OpenAI SDK's client:
            # 5 s; aiohttp: 15 s), so the client closes it first. uvicorn's default of 5 s let a
            # request sent at the moment of expiry meet a connection being closed: a reset.
            timeout_keep_alive=settings.keep_alive_timeout,
            timeout_graceful_shutdown=30,
        )
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(gateway)))
        await server.serve(sockets=[listening])

    import uvloop

    uvloop.run(serve())


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (as uvicorn would bind it), before anything else starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _raise_open_file_limit(max_connections: int, log) -> None:
    """Let the process hold max_connections sockets plus room for backends, files and peers."""
    import resource

    wanted = max_connections + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning(
                "open-file limit below max_connections + 1024", limit=new, max_connections=max_connections
            )


async def _reload(gateway) -> None:
    import structlog

    log = structlog.get_logger("wwwserve_gateway.cli")
    try:
        added, removed = await gateway.reload()
        log.info("config reloaded", added=added, removed=removed)
    except ConfigError as exc:
        log.error("config reload refused", problems=[str(p) for p in exc.problems])


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(min=2, max=16, help="nodes to start; node 0 is the entry")] = 3,
    model: Annotated[str, typer.Option(help="what every node serves: smollm2 or tiny-random")] = "smollm2",
    base_port: Annotated[int, typer.Option(help="node 0's port, the others follow; 0 picks free ports")] = 0,
    traffic: Annotated[bool, typer.Option(help="send the entry a small chat request every 2 s")] = True,
    workdir: Annotated[
        Path | None, typer.Option(help="keep configs, data and logs here (default: a temp dir, removed)")
    ] = None,
) -> None:
    """Run a local network on loopback: an entry node that delegates to the others, with a live view.

    Prints 'entry: http://127.0.0.1:PORT/v1' first on stdout; no API key is needed (any value works).

    Ctrl-C or SIGTERM stops every node it started.
    """
    from wwwserve_gateway.demo import DemoOptions, run

    raise typer.Exit(run(DemoOptions(nodes, model, base_port, traffic, workdir)))


@app.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="the policy file to check")]) -> None:
    """Validate a policy file; exit 2 with one line per problem, naming the key and the fix."""
    cfg = _load(path)
    for warning in cfg.warnings:  # keys accepted without effect (a LiteLLM config's)
        console.print(f"[yellow]warning[/yellow] {warning}", highlight=False)
    table = Table(title=f"{path}: OK")
    for column in ("model_name", "provider", "backend model", "deployment id"):
        table.add_column(column)
    for entry in cfg.model_list:
        table.add_row(entry.model_name, entry.provider, entry.litellm_params["model"], entry.deployment_id)
    Console().print(table)
    Console().print(f"listen: http://{cfg.node.host}:{cfg.node.port}  data_dir: {cfg.node.data_dir}")


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="a known model: smollm2, or tiny-random (needs gguf)")],
    dest: Annotated[
        Path | None, typer.Option("--dir", help="models directory (default: WWWSERVE_HOME/models)")
    ] = None,
) -> None:
    """Fetch a model into the models directory and verify its checksum."""
    import sys

    from wwwserve_gateway.model_store import ModelStoreError, models_dir, pull

    target_dir = dest or models_dir()
    if not (sys.stdout.isatty() and console.is_terminal):
        # Logs and pipes get plain lines on stderr (stdout stays the path alone): no live bar.
        from wwwserve_gateway.pull_progress import ProgressLines

        console.print(f"{name}: fetching", highlight=False, markup=False)
        try:
            path = pull(
                name,
                target_dir,
                ProgressLines(name, lambda line: console.print(line, highlight=False, markup=False)),
            )
        except ModelStoreError as exc:
            console.print(f"error {exc}", highlight=False, markup=False)
            raise typer.Exit(1) from None
        console.print(f"{name}: done", highlight=False, markup=False)
        typer.echo(path)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"{name}: downloading", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, description=f"{name}: extracting", completed=done, total=total)

        try:
            path = pull(name, target_dir, report)
        except ModelStoreError as exc:
            console.print(f"[red]error[/red] {exc}")
            raise typer.Exit(1) from None
    typer.echo(path)


@models_app.command("list")
def models_list(
    dest: Annotated[Path | None, typer.Option("--dir", help="models directory")] = None,
) -> None:
    """Known models and whether they are on disk."""
    from wwwserve_gateway.model_store import KNOWN_MODELS, TINY_MODEL, find_model

    table = Table()
    for column in ("name", "description", "path"):
        table.add_column(column)
    for name, model in KNOWN_MODELS.items():
        table.add_row(name, model.description, str(find_model(name, dest.parent if dest else None) or "-"))
    table.add_row(TINY_MODEL, "random-weight 570 KB llama for tests", str(find_model(TINY_MODEL) or "-"))
    Console().print(table)


def _data_dir(config: Path | None, data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    if config is not None:
        return _load(config).node.data_dir
    from wwwserve_gateway.config.schema import default_home

    return default_home()


DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="the node's data dir")]
OptionalConfig = Annotated[
    Path | None, typer.Option("--config", "-c", help="take the data dir from this config")
]


@keys_app.command("show")
def keys_show(config: OptionalConfig = None, data_dir: DataDirOption = None) -> None:
    """Print the node id, creating the key on first use."""
    from wwwserve_gateway.network.identity import KEY_FILE, NodeIdentity

    directory = _data_dir(config, data_dir)
    existed = (directory / KEY_FILE).exists()
    identity = NodeIdentity.load_or_create(directory)
    if not existed:
        console.print(f"created a new identity in {directory / KEY_FILE}")
    typer.echo(identity.node_id)


@keys_app.command("new")
def keys_new(
    config: OptionalConfig = None,
    data_dir: DataDirOption = None,
    force: Annotated[
        bool, typer.Option(help="replace an existing key (it is kept as identity.key.old)")
    ] = False,
) -> None:
    """Create a new identity: the node becomes a different, unlinkable pseudonym."""
    from wwwserve_gateway.network.identity import KEY_FILE, NodeIdentity

    directory = _data_dir(config, data_dir)
    path = directory / KEY_FILE
    if path.exists():
        if not force:
            console.print(f"[red]error[/red] {path} exists; pass --force to replace it")
            raise typer.Exit(1)
        path.replace(path.with_name(KEY_FILE + ".old"))
    directory.mkdir(parents=True, exist_ok=True)
    identity = NodeIdentity.generate()
    identity.save(path)
    typer.echo(identity.node_id)


@network_app.command("init")
def network_init(
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the genesis file")] = Path(
        "network.yaml"
    ),
    name: Annotated[str, typer.Option(help="the network's name")] = "wwwserve-local",
    interval: Annotated[float | None, typer.Option(help="gossip interval in seconds")] = None,
    allocate: Annotated[
        list[str] | None,
        typer.Option(
            help="NODE_ID=CREDITS or DATA_DIR=CREDITS (repeatable): the credits a founding node's "
            "join grants (a data dir's key is created if it has none). No other key gets any."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write a network genesis file and print its network id."""
    from wwwserve_gateway.network.genesis import GossipParams, LedgerParams, NetworkGenesis, write_genesis
    from wwwserve_gateway.network.identity import NODE_ID, NodeIdentity

    if out.exists() and not force:
        console.print(f"[red]error[/red] {out} exists; pass --force to overwrite it")
        raise typer.Exit(1)
    allocations: dict[str, int] = {}
    for item in allocate or []:
        who, _, credits = item.rpartition("=")
        if not who or not credits.isdigit():
            console.print(
                f"[red]error[/red] --allocate {item!r}: expected NODE_ID=CREDITS or DATA_DIR=CREDITS"
            )
            raise typer.Exit(2)
        node_id = who if NODE_ID.fullmatch(who) else NodeIdentity.load_or_create(Path(who)).node_id
        allocations[node_id] = allocations.get(node_id, 0) + int(credits)
    gossip = GossipParams(interval_s=interval) if interval else GossipParams()
    genesis = NetworkGenesis(name=name, gossip=gossip, ledger=LedgerParams(allocations=allocations))
    write_genesis(genesis, out)
    typer.echo(genesis.network_id)


@network_app.command("id")
def network_id(path: Annotated[Path, typer.Argument(help="a genesis file")]) -> None:
    """Print the network id of a genesis file."""
    from wwwserve_gateway.network.genesis import load_genesis

    try:
        typer.echo(load_genesis(path).network_id)
    except ConfigError as exc:
        console.print(f"[red]error[/red] {escape(exc.render())}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def peers(
    url: Annotated[str, typer.Option(help="a node's URL")] = "http://127.0.0.1:4000",
    key: Annotated[
        str | None,
        typer.Option(
            envvar="WWWSERVE_OPERATOR_KEY", help="an operator (or the admin) key: shows peers' URLs"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON: each peer with its account")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="full ids and URLs (always so when not writing to a terminal)")
    ] = False,
) -> None:
    """Show the nodes a node knows: state, models, load, stake, bonded stake, balance, last heard."""
    import json
    import sys

    from wwwserve_gateway.web.ui.terminal import merge_peers, peers_table

    base = url.rstrip("/")
    known = merge_peers(
        _get_json(base + "/wwwserve/peers", key), _get_json(base + "/wwwserve/ledger/balances")
    )
    if as_json:
        typer.echo(json.dumps(known, indent=2))
        return
    terminal = sys.stdout.isatty()
    out = Console() if terminal else Console(width=10_000, no_color=True)
    out.print(peers_table(known, f"{len(known)} nodes known to {url}", wide or not terminal))


@app.command()
def top(
    url: Annotated[str, typer.Option(help="a node's URL")] = "http://127.0.0.1:4000",
    key: Annotated[
        str | None,
        typer.Option(envvar="WWWSERVE_OPERATOR_KEY", help="an operator (or the admin) key of that node"),
    ] = None,
    interval: Annotated[float, typer.Option(min=0.2, help="seconds between refreshes")] = 1.0,
    once: Annotated[bool, typer.Option(help="print one screen and exit")] = False,
) -> None:
    """A live view of a node: traffic, peers, credits and recent requests (its dashboard's data)."""
    import time

    from rich.live import Live

    from wwwserve_gateway.web.ui.terminal import top_view

    snapshot_url = url.rstrip("/") + "/ui/api/snapshot"
    if once:
        Console().print(top_view(_get_json(snapshot_url, key), url))
        return
    with Live(top_view(_get_json(snapshot_url, key), url), refresh_per_second=4, screen=True) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(top_view(_get_json(snapshot_url, key), url))
        except KeyboardInterrupt:
            pass


def _get_json(url: str, key: str | None = None):
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        console.print(f"[red]error[/red] cannot read {url}: {exc}")
        raise typer.Exit(1) from None


UrlOption = Annotated[str, typer.Option(help="a node's URL")]


@ledger_app.command("balances")
def ledger_balances(url: UrlOption = "http://127.0.0.1:4000") -> None:
    """Balances as a node folds them: liquid, bonded, unbonding, barred."""
    balances = _get_json(url.rstrip("/") + "/wwwserve/ledger/balances")
    table = Table(title=f"{len(balances)} accounts at {url}")
    for column in ("node", "liquid", "bonded", "unbonding", "barred"):
        table.add_column(column, justify="right")
    for node_id, account in sorted(balances.items()):
        table.add_row(
            node_id[:16],
            *(f"{account[k]:g}" for k in ("liquid", "bonded", "unbonding")),
            "yes" if account["barred"] else "",
        )
    Console().print(table)


@ledger_app.command("ops")
def ledger_ops(
    url: UrlOption = "http://127.0.0.1:4000",
    author: Annotated[str | None, typer.Option(help="whose chain (default: the node's own)")] = None,
    start: Annotated[int, typer.Option("--from", help="first seq")] = 1,
    limit: Annotated[int, typer.Option(help="operations at most")] = 50,
) -> None:
    """One author's chain of operations."""
    query = f"from={start}&limit={limit}" + (f"&author={author}" if author else "")
    ops = _get_json(url.rstrip("/") + "/wwwserve/ledger/ops?" + query)
    table = Table(title=f"{len(ops)} operations")
    for column in ("seq", "kind", "ts", "hash", "body"):
        table.add_column(column)
    for op in ops:
        table.add_row(str(op["seq"]), op["kind"], f"{op['ts']:.3f}", op["hash"][:16], str(op["body"])[:60])
    Console().print(table)


@ledger_app.command("verify")
def ledger_verify(
    config: OptionalConfig = None,
    db: Annotated[str | None, typer.Option(help="a database URL (default: the config's node ledger)")] = None,
) -> None:
    """Re-check a whole ledger database offline: signatures, hashes, chain links, heads."""
    from wwwserve_gateway.network.genesis import NetworkGenesis, load_genesis
    from wwwserve_gateway.plugin_api.loading import PluginLoadError, plugin_class, validate_settings
    from wwwserve_gateway.plugin_api.slots import LEDGER

    if db is None and config is None:
        console.print("[red]error[/red] give --config FILE or --db URL")
        raise typer.Exit(2)
    cfg = _load(config) if config else GatewayConfig()
    genesis = load_genesis(cfg.node.network) if cfg.node.network else NetworkGenesis()
    try:
        ledger = plugin_class(LEDGER, cfg.ledger.plugin)
    except PluginLoadError as exc:
        console.print(f"[red]error[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    settings, problems = validate_settings(ledger.Settings, cfg.ledger.settings, ("ledger", "settings"))
    if settings is None:
        console.print("[red]config error[/red] " + "; ".join(map(str, problems)), highlight=False)
        raise typer.Exit(2)
    try:
        with console.status("verifying every operation"):
            where, problems_found = ledger.verify_offline(settings, cfg.node.data_dir, genesis, db)
    except Exception as exc:  # an unreachable database, a ledger of another network
        console.print(f"[red]error[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    for problem in problems_found:
        console.print(f"[red]✗[/red] {problem}", highlight=False)
    if problems_found:
        raise typer.Exit(1)
    typer.echo(f"OK: {where}")


@app.command("emulate-engine")
def emulate_engine(
    profile: Annotated[
        str, typer.Option(help="a built-in profile (e.g. qwen3-8b-rtx3090) or a YAML/JSON profile file")
    ],
    port: Annotated[int, typer.Option(help="listen port; 0 picks a free one (printed on stdout)")],
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    time_scale: Annotated[
        float, typer.Option(min=0.001, help="run this many times faster than the modelled hardware")
    ] = 1.0,
    model: Annotated[str | None, typer.Option(help="the model name served (default: the profile's)")] = None,
    seed: Annotated[
        int | None, typer.Option(help="seed of the output lengths drawn when a request sets none")
    ] = None,
) -> None:
    """Emulate a GPU inference engine (vLLM's OpenAI API and /metrics) from a timing model.

    Prints 'listening http://HOST:PORT' on stdout once bound. Stops on SIGTERM, or when its stdin is a
    pipe that closes. docs/emulator.md describes the model.
    """
    from wwwserve_gateway.emulator.profiles import load_profile
    from wwwserve_gateway.emulator.server import serve

    try:
        chosen = load_profile(profile)
    except ValueError as exc:
        console.print(f"[red]error[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    import uvloop

    uvloop.run(
        serve(chosen, model or chosen.model, host, port, time_scale, seed, lambda s: print(s, flush=True))
    )
