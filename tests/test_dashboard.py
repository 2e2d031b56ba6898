"""The operator's dashboard (/ui) and the API docs (/docs), as a person uses them: a real network of
three node processes in front of the instant stub backend (benchmarks/stub_server.py), traffic
through the entry, and the pages opened in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium). What the page shows must equal what the node's JSON APIs
say; a killed node must show dead within the gossip bound.

Screenshots go to $WWWSERVE_SCREENSHOT_DIR when it is set (docs/img/dashboard.png comes from there),
else to the test's temporary directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import ListeningChild, NodeProcess, founding_allocations, no_duels, wait_until
from wwwserve_gateway.network.genesis import GossipParams, LedgerParams, NetworkGenesis, write_genesis

KEY = "operator-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "stub"
GOSSIP = GossipParams(interval_s=0.3, probe_timeout_s=0.25, suspect_timeout_s=1.5, refresh_s=2.0)
LEDGER = LedgerParams(payment_batch_window_s=0.3, price_per_request=1.0, duels=no_duels())
BOND = 100
# A dead node is probed within a few rounds, suspected one round later, declared dead
# suspect_timeout_s after that, and the news spreads in O(log N) rounds (tests/test_membership.py);
# the page then shows it at its next tick (one second) of the live feed.
NODES = 3
DEATH_BOUND_S = (
    4 + 1 + math.ceil(GOSSIP.suspect_timeout_s / GOSSIP.interval_s) + 2 * math.ceil(math.log2(NODES))
) * GOSSIP.interval_s + 2.0
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@dataclass
class Net:
    stub: ListeningChild
    nodes: dict[str, NodeProcess]
    ids: dict[str, str]

    @property
    def entry(self) -> NodeProcess:
        return self.nodes["E"]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    workdir = tmp_path_factory.mktemp("dashboard")
    stub = ListeningChild("stub", [sys.executable, "benchmarks/stub_server.py", "--port", "0"])
    genesis = workdir / "network.yaml"
    funded = LEDGER.model_copy(update={"allocations": founding_allocations(workdir, ["E", "X1", "X2"], 1000)})
    write_genesis(NetworkGenesis(name="dashboard-test", gossip=GOSSIP, ledger=funded), genesis)
    policies = {
        # E never serves apps locally: it delegates every request to X1 or X2.
        "E": {"target_usage": -1, "offload_frequency": 1.0, "accept_frequency": 0.0, "bond": 0},
        "X1": {"target_usage": 1.0, "accept_frequency": 1.0, "bond": BOND},
        "X2": {"target_usage": 1.0, "accept_frequency": 1.0, "bond": BOND},
    }
    nodes: dict[str, NodeProcess] = {}
    try:
        for name, policy in policies.items():
            config = {
                "node": {
                    "network": str(genesis),
                    "bootstrap": [nodes["E"].url] if nodes else [],
                    "operator_keys": [KEY],
                },
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": "openai/stub",
                            "api_base": stub.url + "/v1",
                            "api_key": "x",
                        },
                    }
                ],
                "policy": {"settings": policy},
            }
            nodes[name] = NodeProcess(config, workdir, name=name).start()
        ids = {name: node.own_id() for name, node in nodes.items()}
        entry = nodes["E"]

        def staked() -> bool:
            view, held = entry.peers(), entry.balances()
            return all(
                view.get(ids[x], {}).get("state") == "alive"
                and held.get(ids[x], {}).get("bonded") == BOND
                and (view[ids[x]].get("stake") or 0) > 0
                for x in ("X1", "X2")
            )

        wait_until(staked, 60, interval=0.1, what="executors alive and staked at the entry")
        yield Net(stub, nodes, ids)
    finally:
        for node in nodes.values():
            node.stop(signal.SIGKILL)
        stub.stop()


def chat(node: NodeProcess, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    answer = httpx.post(node.url + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer


# -- the HTTP surface -------------------------------------------------------------------------------


def test_the_dashboard_needs_an_operator_key(net: Net) -> None:
    url = net.entry.url
    page = httpx.get(url + "/ui")
    assert page.status_code == 200 and 'action="/ui/login"' in page.text  # the sign-in form
    assert httpx.get(url + "/ui/api/snapshot").status_code == 401
    assert httpx.get(url + "/ui/api/snapshot", headers={"Authorization": "Bearer wrong"}).status_code == 401
    wrong = httpx.post(url + "/ui/login", data={"key": "wrong"})
    assert wrong.status_code == 401 and "not an operator key" in wrong.text
    signed_in = httpx.post(url + "/ui/login", data={"key": KEY})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui"
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie and KEY not in cookie
    with httpx.Client(base_url=url, cookies=signed_in.cookies) as browser:
        assert browser.get("/ui/api/snapshot").status_code == 200
        assert 'id="page-network"' in browser.get("/ui").text
    snapshot = httpx.get(url + "/ui/api/snapshot", headers=AUTH).json()
    assert snapshot["node"]["id"] == net.ids["E"]


def test_assets_ship_in_the_package_with_their_licences(net: Net) -> None:
    url = net.entry.url
    for path in ("vendor/uPlot.iife.min.js", "vendor/swagger-ui-bundle.js", "app.js", "app.css"):
        answer = httpx.get(f"{url}/ui/static/{path}")
        assert answer.status_code == 200 and answer.content, path
        again = httpx.get(f"{url}/ui/static/{path}", headers={"If-None-Match": answer.headers["etag"]})
        assert again.status_code == 304
    for licence in ("LICENSE-uplot.txt", "LICENSE-swagger-ui.txt"):
        assert "Permission" in httpx.get(f"{url}/ui/static/vendor/{licence}").text or "Apache" in (
            httpx.get(f"{url}/ui/static/vendor/{licence}").text
        )
    assert httpx.get(url + "/ui/static/../routes.py").status_code == 404
    assert httpx.get(url + "/ui/static/%2e%2e/routes.py").status_code == 404
    docs = httpx.get(url + "/docs")
    assert docs.status_code == 200 and "/ui/static/vendor/swagger-ui-bundle.js" in docs.text
    # Nothing is fetched from elsewhere: every script and stylesheet is the node's own.
    index = httpx.get(url + "/ui", headers=AUTH).text
    assert "http://" not in index and "https://" not in index.replace("http://www.w3.org", "")


# -- in a real browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot_dir(tmp_path: Path) -> Path:
    where = Path(os.environ.get("WWWSERVE_SCREENSHOT_DIR") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def sign_in(driver, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/ui")
    form = driver.find_elements(By.ID, "key")
    if form:  # not signed in yet (a session cookie skips the form)
        form[0].send_keys(KEY)
        driver.find_element(By.ID, "sign-in").click()
    wait_until(lambda: driver.find_elements(By.ID, "page-network"), 20, what="the dashboard after sign-in")


def shown_peers(driver) -> dict[str, dict[str, str]]:
    """The peers table as the page shows it: id -> {state, balance (the number shown)}."""
    rows = driver.execute_script(
        """return [...document.querySelectorAll('#peers tbody tr[data-peer]')].map(tr => [
            tr.dataset.peer,
            tr.querySelector('[data-field=state]').innerText.trim(),
            tr.querySelector('[data-field=balance]').innerText.trim()])"""
    )
    return {peer: {"state": st, "balance": bal} for peer, st, bal in rows}


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_the_page_shows_what_the_apis_say(net: Net, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    entry = net.entry
    last_route = ""
    for i in range(8):
        last_route = chat(entry, stream=i % 2 == 1).headers["x-wwwserve-route"]
    sign_in(driver, entry.url)

    def agrees() -> bool:
        shown = shown_peers(driver)
        peers, balances = entry.peers(), entry.balances()
        count = driver.find_element(By.ID, "peer-count").text
        return (
            count == str(len(peers))
            and set(shown) == set(peers)
            and all(shown[p]["state"] == peers[p]["state"] for p in peers)
            and all(abs(number(shown[p]["balance"]) - balances[p]["liquid"]) < 1e-4 for p in peers)
        )

    wait_until(agrees, 30, interval=0.2, what="peers, states and balances on the page equal the APIs'")
    assert {net.ids["E"], net.ids["X1"], net.ids["X2"]} == set(shown_peers(driver))
    links = driver.find_element(By.ID, "link-count").text
    assert int(links) >= 2  # the entry holds a connection to each executor
    where = screenshot_dir(tmp_path)
    driver.save_screenshot(str(where / "dashboard-network.png"))

    driver.find_element(By.CSS_SELECTOR, "a[data-tab=traffic]").click()

    def last_request_route() -> str | None:
        cells = driver.find_elements(By.CSS_SELECTOR, "#recent tbody tr[data-request] [data-route]")
        return cells[0].get_attribute("data-route") if cells else None

    wait_until(lambda: last_request_route() == last_route, 20, what="the last request's route on the page")
    assert last_route.split(",")[0] == net.ids["E"] and len(last_route.split(",")) == 2

    def charted() -> bool:  # traffic while the page watches: the charts fill
        chat(entry, stream=True)
        return driver.execute_script(
            "const s = state.snap; return !!s && s.traffic.points.filter(p => p.delegated > 0).length >= 3"
        )

    wait_until(charted, 30, interval=0.05, what="requests per second charted")
    driver.save_screenshot(str(where / "dashboard.png"))
    for tab in ("credits", "backends"):
        driver.find_element(By.CSS_SELECTOR, f"a[data-tab={tab}]").click()
        wait_until(
            lambda tab=tab: driver.find_element(By.ID, f"page-{tab}").is_displayed(),
            10,
            what=f"the {tab} page",
        )
    backend_rows = driver.find_elements(By.CSS_SELECTOR, "#backends tbody tr[data-backend]")
    assert [r.get_attribute("data-backend") for r in backend_rows] == ["stub:openai/stub"]
    driver.save_screenshot(str(where / "dashboard-backends.png"))
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_docs_list_every_route(net: Net, browser) -> None:

    driver = browser
    document = httpx.get(net.entry.url + "/openapi.json").json()
    expected = {(m.upper(), path) for path, ops in document["paths"].items() for m in ops}
    driver.get(net.entry.url + "/docs")

    def listed() -> set[tuple[str, str]]:
        return set(
            map(
                tuple,
                driver.execute_script(
                    """return [...document.querySelectorAll('.opblock')].map(b => [
                    b.querySelector('.opblock-summary-method').innerText.trim(),
                    b.querySelector('.opblock-summary-path').getAttribute('data-path')])"""
                ),
            )
        )

    wait_until(lambda: listed() == expected, 30, interval=0.2, what="every route of /openapi.json on /docs")
    assert ("POST", "/v1/chat/completions") in expected


def wwwserve(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "wwwserve_gateway", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_cli_shows_peers_with_stake_and_balance_and_a_top_view(net: Net) -> None:
    url = net.entry.url
    listed = {p["id"]: p for p in json.loads(wwwserve("peers", "--url", url, "--json"))}
    assert set(listed) == set(net.ids.values())
    for peer in listed.values():
        assert set(peer["account"]) >= {"liquid", "bonded", "unbonding", "barred"}
        assert peer["url"] is None  # no operator key given
    assert listed[net.ids["X1"]]["account"]["bonded"] == BOND
    # Not a terminal: full ids and URLs, never cut.
    table = wwwserve("peers", "--url", url, "--key", KEY)
    for node_id in net.ids.values():
        assert node_id in table
    assert net.nodes["X1"].url in table
    screen = wwwserve("top", "--url", url, "--key", KEY, "--once")
    assert "req/s" in screen and "peers (3)" in screen and "credits" in screen


def test_a_killed_node_shows_dead_within_the_gossip_bound(net: Net, browser) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    sign_in(driver, net.entry.url)
    driver.find_element(By.CSS_SELECTOR, "a[data-tab=network]").click()
    victim = net.ids["X2"]
    wait_until(lambda: shown_peers(driver).get(victim, {}).get("state") == "alive", 20, what="victim alive")
    killed_at = time.monotonic()
    net.nodes["X2"].stop(signal.SIGKILL)
    wait_until(
        lambda: shown_peers(driver).get(victim, {}).get("state") == "dead",
        DEATH_BOUND_S * 3,
        interval=0.1,
        what="the killed node shown dead",
    )
    took = time.monotonic() - killed_at
    assert net.entry.peers()[victim]["state"] == "dead"
    assert took <= DEATH_BOUND_S, f"shown dead after {took:.1f} s; the bound is {DEATH_BOUND_S:.1f} s"
    events = driver.find_elements(By.CSS_SELECTOR, "#timeline li[data-kind=dead]")
    assert events, "the death is on the timeline"
