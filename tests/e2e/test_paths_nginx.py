"""Path normalisation proven against nginx as the reference (issue 14, item 1).

nginx matches `location` on the decoded, slash-merged, dot-resolved URI, so a route
behind auth cannot be walked around with `/%61dmin` or `//admin`. The same routes are
written as nginx locations and as a routes.yaml; hypothesis generates paths full of
escapes of every kind, dot segments (encoded ones too), repeated and encoded slashes and
mixed-case hex; for every path Gatehouse must refuse what nginx refuses (400), pick the
route nginx picks, and forward a path that decodes to nginx's `$uri`. The comparison
runs over HTTP/1.1 on both codecs and both loops, and over HTTP/2.

nginx decodes `%2F` into a separator, which is Gatehouse's `escaped_slashes: unescape`;
the default, `reject`, must agree with nginx on every path without an escaped slash and
answer 400 to the others.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.testing import RunningGateway, ScriptedUpstream, running_gateway
from proxy.testing.trace import EXCHANGE_HEADER, ROUTE_HEADER
from tests.support.h2_client import H2Client
from tests.support.helpers import RawClient
from tests.support.nginx_server import running_nginx

pytestmark = pytest.mark.socket

# (route name, routes.yaml match, the equivalent nginx location)
ROUTES = [
    ("exact", "{path: /exact}", "location = /exact"),
    ("admin", "{path_prefix: /admin}", "location /admin"),
    ("api", "{path_prefix: /api/}", "location /api/"),
    ("static", "{path_prefix: /static/files}", "location /static/files"),
    ("users", '{path_regex: "/users/[0-9]+"}', "location ~ ^/users/[0-9]+$"),
    ("public", "{path_prefix: /}", "location /"),
]
# nginx answers with the location's name, a newline, and $uri (which may hold any byte).
NGINX_SERVER = "\n".join(
    f'    {location} {{ return 200 "{name}\\n$uri"; }}' for name, _, location in ROUTES
)


def gateway_config(codec: str, escaped_slashes: str) -> str:
    routes = "\n".join(
        f"  - {{name: {name}, match: {match}, upstream: app}}" for name, match, _ in ROUTES
    )
    return f"""
listeners:
  - bind: 127.0.0.1:0
http1_parser: {codec}
path_normalization: {{escaped_slashes: {escaped_slashes}}}
upstreams:
  app:
    endpoints: [http://app]
routes:
{routes}
"""


# -- the paths ----------------------------------------------------------------------------

WORDS = ["admin", "api", "exact", "static", "files", "users", "42", "x", "Admin", "~u", "a.b"]
DOT_SEGMENTS = [".", "..", "%2e", "%2E", "%2e%2e", ".%2E", "%2E.", "...", ".a"]
SEPARATORS = ["/", "/", "/", "//", "%2F", "%2f", "%5C", "%5c", "\\", "/./", "/../"]
SUB_DELIMS = list("!$&'()*+,;=:@-_")


def _spelt(word: str, encoded: list[bool], upper: bool) -> str:
    """`word` with the characters `encoded` marks percent-encoded (hex in either case)."""
    out = []
    for char, encode in zip(word, encoded + [False] * len(word), strict=False):
        if encode:
            escape = f"%{ord(char):02X}"
            out.append(escape if upper else escape.lower())
        else:
            out.append(char)
    return "".join(out)


@st.composite
def words(draw: st.DrawFn) -> str:
    word = draw(st.sampled_from(WORDS))
    encoded = draw(st.lists(st.booleans(), max_size=len(word)))
    return _spelt(word, encoded, draw(st.booleans()))


escapes = st.builds(
    lambda value, upper: f"%{value:02X}" if upper else f"%{value:02x}",
    st.integers(0, 255),
    st.booleans(),
)
segments = st.one_of(
    words(),
    words(),
    st.sampled_from(DOT_SEGMENTS),
    escapes,
    st.sampled_from(SUB_DELIMS),
    st.lists(st.one_of(words(), escapes, st.sampled_from(SUB_DELIMS)), max_size=3).map("".join),
)
paths = st.builds(
    lambda first, rest: "/" + first + "".join(separator + segment for separator, segment in rest),
    segments,
    st.lists(st.tuples(st.sampled_from(SEPARATORS), segments), max_size=6),
)
ESCAPED_SLASH = ("%2f", "%5c", "\\")


# -- asking both --------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a server did with a path: its status, and for a 200 the route and the path
    (decoded once) that the route's upstream saw."""

    status: int
    route: str = ""
    uri: bytes = b""


async def ask_nginx(port: int, path: bytes) -> Verdict:
    async with await RawClient.connect(("127.0.0.1", port)) as client:
        await client.send(b"GET " + path + b" HTTP/1.1\r\nHost: ref.test\r\n\r\n")
        response = await client.response()
    if response.status != 200:
        return Verdict(response.status)
    route, _, uri = response.body.partition(b"\n")
    return Verdict(200, route.decode(), uri)


@dataclass
class Gateway:
    running: RunningGateway
    upstream: ScriptedUpstream

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.running.server.addresses[0]
        return host, port

    def verdict(self, status: int, route: str | None, exchange: str | None) -> Verdict:
        if status != 200:
            return Verdict(status)
        received = [r for r in self.upstream.requests if r.exchange == exchange]
        assert len(received) == 1, f"the upstream got {len(received)} requests"
        return Verdict(200, route or "", unquote_to_bytes(received[0].path))

    async def ask_h1(self, path: bytes) -> Verdict:
        async with await RawClient.connect(self.address) as client:
            await client.send(b"GET " + path + b" HTTP/1.1\r\nHost: ref.test\r\n\r\n")
            response = await client.response()
        return self.verdict(
            response.status, response.header(ROUTE_HEADER), response.header(EXCHANGE_HEADER)
        )

    async def ask_h2(self, client: H2Client, path: bytes) -> Verdict:
        result = await client.request(path.decode("latin-1"))
        if result.reset_code is not None:
            return Verdict(0)
        route, exchange = (
            result.header(ROUTE_HEADER.encode()),
            result.header(EXCHANGE_HEADER.encode()),
        )
        return self.verdict(
            result.status,
            route.decode() if route is not None else None,
            exchange.decode() if exchange is not None else None,
        )


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with running_nginx(NGINX_SERVER, tmp_path_factory.mktemp("nginx")) as port:
        yield port


@pytest.fixture
async def gateways(codec: str) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two gateways on the same routes: `unescape` (nginx's way) and the default."""
    apps = ScriptedUpstream("app"), ScriptedUpstream("app")  # exchange ids are per gateway
    for app in apps:
        await app.start()
    try:
        async with (
            running_gateway(
                gateway_config(codec, "unescape"), upstreams={"app": apps[0]}
            ) as nginx_like,
            running_gateway(gateway_config(codec, "reject"), upstreams={"app": apps[1]}) as default,
        ):
            yield Gateway(nginx_like, apps[0]), Gateway(default, apps[1])
    finally:
        for app in apps:
            await app.stop()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=paths)
# The examples: each reached the upstream as /admin through the public route.
@example(path="/%61dmin")
@example(path="//admin")
@example(path="/./admin")
@example(path="/x/../admin")
@example(path="/%2fadmin")
@example(path="/adm%69n/users")
@example(path="/x/..%2fadmin/%2e%2e/api/")
@example(path="/users/%34%32")
async def test_gatehouse_routes_every_path_as_nginx_does(
    nginx: int, gateways: tuple[Gateway, Gateway], path: str
) -> None:
    raw = path.encode("latin-1")
    reference = await ask_nginx(nginx, raw)
    nginx_like, default = gateways
    assert await nginx_like.ask_h1(raw) == reference, path
    if any(escaped in path.lower() for escaped in ESCAPED_SLASH):
        assert await default.ask_h1(raw) == Verdict(400), path
    else:
        assert await default.ask_h1(raw) == reference, path


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=paths)
@example(path="/%61dmin")
@example(path="//admin")
@example(path="/x/..%2fadmin")
async def test_http2_routes_every_path_as_nginx_does(
    nginx: int, gateways: tuple[Gateway, Gateway], path: str
) -> None:
    raw = path.encode("latin-1")
    reference = await ask_nginx(nginx, raw)
    nginx_like, default = gateways
    host, port = nginx_like.address
    async with await H2Client.connect(host, port) as client:
        assert await nginx_like.ask_h2(client, raw) == reference, path
    host, port = default.address
    async with await H2Client.connect(host, port) as client:
        answer = await default.ask_h2(client, raw)
    if any(escaped in path.lower() for escaped in ESCAPED_SLASH):
        assert answer == Verdict(400), path
    else:
        assert answer == reference, path
