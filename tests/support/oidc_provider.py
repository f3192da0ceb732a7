"""A real, certified OpenID Provider for the `oidc` tests, and a browser to log in with.

`OidcProvider` runs node-oidc-provider (tests/support/oidc/provider.mjs, its packages
installed by `.ci/system-deps`: `npm ci` there) with the machine's Node.js, on a free
127.0.0.1 port that the provider picks itself; `issuer` is known once it listens. Every
request it receives is a line of `requests()` (`GET /auth`, `POST /token`...), written
before it is answered: a test that has its answer can count what reached the provider.

Its clients (`CLIENTS`) are "native" applications (RFC 8252), whose loopback redirect
URIs match on any port (section 7.3): the gateways the tests start on port 0 need no port
registered in advance. `app` has the usual token lifetimes; `short`'s access and ID
tokens live one second, so that a test can wait for them to expire.

`Browser` is an httpx client that logs in as a person would: it follows redirects one by
one (keeping each hop), and fills and posts the forms the provider shows (the login form,
with any login and password; the consent form; the logout confirmation), and keeps the
cookies of both sides.
"""

from __future__ import annotations

import base64
import functools
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.system_process import spawn_logged, stop, wait_until_ready

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
# A bound, not a race: node loading oidc-provider's modules on a machine busy with the
# rest of the suite can take seconds (the failure message says how long it waited).
START_TIMEOUT_S = 60.0
SECRET = "gatehouse-test-client-secret-0123456789"
API_AUDIENCE = "urn:gatehouse:api"  # provider.mjs's resource: its access tokens' aud
CLIENTS = [
    {
        "client_id": client_id,
        "client_secret": SECRET,
        "application_type": "native",
        "redirect_uris": ["http://127.0.0.1/oidc/callback"],
        "post_logout_redirect_uris": ["http://127.0.0.1/bye"],
        "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
        "response_types": ["code"],
    }
    for client_id in ("app", "short")
]
TOKEN_TTL = {"short": 1}
NAVIGATE = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}


@functools.cache
def signing_key() -> dict[str, str]:
    """The providers' RSA signing key as a private JWK, made once per test session."""
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()

    def b64(value: int) -> str:
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    public = numbers.public_numbers
    return {
        "kty": "RSA",
        "n": b64(public.n),
        "e": b64(public.e),
        "d": b64(numbers.d),
        "p": b64(numbers.p),
        "q": b64(numbers.q),
        "dp": b64(numbers.dmp1),
        "dq": b64(numbers.dmq1),
        "qi": b64(numbers.iqmp),
    }


class OidcProvider:
    """One node-oidc-provider process in `directory` (its config, output and request
    log go there)."""

    def __init__(self, directory: Path) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("the oidc tests need Node.js (node) on the PATH")
        if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError(f"oidc-provider is not installed: run .ci/system-deps ({OIDC_DIR})")
        self.node = node
        self.directory = directory
        self.issuer = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory / "requests.log"
        self._output = directory / "provider.out"

    def __repr__(self) -> str:
        return f"<OidcProvider {self.issuer or 'not started'}>"

    def start(self) -> OidcProvider:
        """Start it and wait until it listens (its issuer line is printed).

        Raises:
            AssertionError: it exited, or said nothing within START_TIMEOUT_S (its
                output attached).
        """
        config = self.directory / "provider.json"
        config.write_text(
            json.dumps(
                {
                    "log": str(self._log),
                    "clients": CLIENTS,
                    "token_ttl": TOKEN_TTL,
                    "signing_key": signing_key(),
                }
            )
        )
        self._log.write_text("")
        self._output.write_bytes(b"")
        self.process = spawn_logged(
            [self.node, "provider.mjs", str(config)], self._output, cwd=OIDC_DIR
        )
        wait_until_ready(
            self.process,
            self._issuer_printed,
            what=repr(self),
            log=self._output,
            timeout_s=START_TIMEOUT_S,
        )
        return self

    def _issuer_printed(self) -> bool:
        for line in self._output.read_text().splitlines():
            if line.startswith('{"issuer"'):
                self.issuer = json.loads(line)["issuer"]
        return bool(self.issuer)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and reap it."""
        process, self.process = self.process, None
        if process is not None:
            stop(process)

    def requests(self) -> list[str]:
        """`METHOD PATH` of every request it received, in order."""
        return self._log.read_text().splitlines()

    async def client_credentials(self, client_id: str = "app") -> dict[str, Any]:
        """A token answer for the client itself (its access token is a JWT for the API)."""
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(
                f"{self.issuer}/token",
                data={"grant_type": "client_credentials", "scope": "api:read"},
                auth=(client_id, SECRET),
            )
        assert answer.status_code == 200, answer.text
        tokens: dict[str, Any] = answer.json()
        return tokens


class _Forms(HTMLParser):
    """The forms of a page: action, method and fields, with the submit button that names
    the form from outside it (`<button form="id" name=... value=...>`)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._outside: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        if tag == "form":
            self._open = {
                "id": found.get("id", ""),
                "action": found.get("action", ""),
                "method": found.get("method", "get").lower(),
                "fields": {},
            }
            self.forms.append(self._open)
        elif tag in ("input", "button") and found.get("name"):
            if found.get("form"):
                self._outside.append((found["form"], found["name"], found.get("value", "")))
            elif self._open is not None:
                self._open["fields"].setdefault(found["name"], found.get("value", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None

    def result(self) -> list[dict[str, Any]]:
        for form_id, name, value in self._outside:  # the first button: "Yes, sign me out"
            for form in self.forms:
                if form["id"] == form_id:
                    form["fields"].setdefault(name, value)
        return self.forms


class Browser:
    """An httpx client that logs in as a person would (see the module doc)."""

    def __init__(self, login: str = "alice") -> None:
        self.client = httpx.AsyncClient(timeout=10, follow_redirects=False)
        self.login = login
        self.hops: list[httpx.Response] = []  # every response of the last `navigate`
        self.forms: list[str] = []  # the prompt of each form posted (login, consent, ...)

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.client.aclose()

    async def get(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """One navigation request, no redirect followed."""
        return await self.client.get(url, headers=NAVIGATE | (headers or {}))

    async def navigate(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        *,
        stop_at: str = "",
        max_hops: int = 20,
    ) -> httpx.Response:
        """Go to `url` and on, as a browser would: follow each redirect, post each form
        the provider shows; the last answer (a page without a form, an error, or the
        answer from path `stop_at`)."""
        self.hops = []
        response = await self.get(url, headers)
        for _ in range(max_hops):
            self.hops.append(response)
            if response.url.path == stop_at:
                return response
            location = response.headers.get("location")
            if response.is_redirect and location:
                response = await self.get(str(response.url.join(location)))
                continue
            forms = _Forms()
            if "html" in response.headers.get("content-type", ""):
                forms.feed(response.text)
            page_forms = forms.result()
            if response.status_code != 200 or not page_forms:
                return response
            response = await self._submit(response, page_forms[0])
        raise AssertionError(f"still redirected after {max_hops} hops: {self.hops}")

    async def _submit(self, page: httpx.Response, form: dict[str, Any]) -> httpx.Response:
        fields = dict(form["fields"])
        self.forms.append(fields.get("prompt") or ("logout" if "logout" in fields else "form"))
        if "login" in fields:
            fields["login"], fields["password"] = self.login, "any password"
        action = str(page.url.join(form["action"] or str(page.url)))
        if form["method"] == "post":
            return await self.client.post(action, data=fields, headers=NAVIGATE)
        return await self.client.get(action, params=fields, headers=NAVIGATE)

    def cookie(self, name: str) -> str | None:
        """The value of cookie `name` the browser holds (for any path), or None."""
        for cookie in self.client.cookies.jar:
            if cookie.name == name:
                return cookie.value
        return None
