// A certified OpenID Provider (node-oidc-provider) for the oidc middleware's tests:
// tests/support/oidc_provider.py starts it as `node provider.mjs CONFIG.json` and reads
// what it prints.
//
// CONFIG.json: {"log": path, "clients": [client metadata...], "token_ttl": {client_id: s},
//               "signing_key": a private RSA JWK}
// - The signing key comes from the config (made once per test session in Python: an RSA
//   key generated here on every start cost up to seconds on a busy machine).
// - It listens on a free 127.0.0.1 port, and only then makes the provider, whose issuer
//   is http://127.0.0.1:PORT (so no port is chosen before it is free), and prints
//   `{"issuer": ...}` on one line.
// - Every request is written to `log` as `METHOD PATH` as it arrives, before it is
//   answered, so a test that has its answer can count what reached the provider.
// - Logins go through the built-in forms (devInteractions: any login and password pass,
//   then a consent form); the account's claims are made from its login.
// - Access tokens are JWTs (RFC 9068) for the resource `urn:gatehouse:api`; ID tokens
//   carry the scopes' claims. Refresh tokens are issued to every client allowed the
//   refresh_token grant. PKCE is required of every authorization request.
// - `token_ttl` gives a client's access and ID tokens a short life (seconds) so that a
//   test can wait for them to expire; the others live 5 minutes.
import { randomBytes } from 'node:crypto';
import { appendFileSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';

import Provider from 'oidc-provider';

const API = 'urn:gatehouse:api';
const DEFAULT_TTL_S = 300;

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const tokenTtl = config.token_ttl ?? {};
const ttl = (_ctx, _token, client) => tokenTtl[client?.clientId] ?? DEFAULT_TTL_S;

const signingKey = { ...config.signing_key, kid: 'test-rs256', alg: 'RS256', use: 'sig' };

const server = createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: config.clients,
    jwks: { keys: [signingKey] },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'groups'],
    },
    conformIdTokenClaims: false, // the scopes' claims go in the ID token, as the gateway reads them
    async findAccount(_ctx, sub) {
      return {
        accountId: sub,
        async claims() {
          return {
            sub,
            email: `${sub}@example.test`,
            email_verified: true,
            name: `User ${sub}`,
            groups: ['staff', `team-${sub}`],
          };
        },
      };
    },
    features: {
      devInteractions: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => API,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resource, client) => {
          if (resource !== API) throw new Provider.errors.InvalidTarget();
          return {
            scope: 'api:read',
            audience: API,
            accessTokenFormat: 'jwt',
            accessTokenTTL: tokenTtl[client.clientId] ?? DEFAULT_TTL_S,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    pkce: { required: () => true },
    ttl: {
      AccessToken: ttl,
      IdToken: ttl,
      ClientCredentials: ttl,
      AuthorizationCode: 60,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
      RefreshToken: 3600,
    },
  });
  provider.use(async (ctx, next) => {
    appendFileSync(config.log, `${ctx.method} ${ctx.path}\n`);
    await next();
  });
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});
