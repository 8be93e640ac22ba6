// Package proxy is pullsecret's server: the registry token server, project
// tokens, the authenticating pull-through proxy to upstream registries and
// the credential API of the helpers' remote mode.
package proxy

import (
	"errors"
	"net/http"
	"slices"
)

// ErrNoAuth is returned by Authenticate for a request without credentials.
var ErrNoAuth = errors.New("authentication required")

// Token scopes: what a project token may be used for.
const (
	ScopePull        = "pull"        // pull through the proxy
	ScopePush        = "push"        // push through the proxy
	ScopeCredentials = "credentials" // receive upstream credentials (helper remote mode)
)

// Access is one entry of a registry token's "access" claim, as the
// distribution token spec defines it.
type Access struct {
	Type    string   `json:"type"` // "repository" or "registry"
	Name    string   `json:"name"` // e.g. "ghcr.io/acme/app" (upstream host first)
	Actions []string `json:"actions"`
}

// Principal is an authenticated client of the proxy.
type Principal struct {
	Project string
	TokenID string   // the project token's id, never the token itself
	Scopes  []string // the project token's scopes
	// Access is what the bearer JWT grants; nil when the client
	// authenticated with Basic auth straight on /v2/, in which case the
	// token's scopes and repository patterns decide (see Allows).
	Access []Access
	// Repositories are the project token's repository patterns; empty
	// means every repository of the project's upstreams.
	Repositories []string
}

// HasScope reports whether the principal's token carries scope.
func (p *Principal) HasScope(scope string) bool { return slices.Contains(p.Scopes, scope) }

// Authenticator authenticates requests to the registry API and writes the
// challenge that sends clients to the token server.
type Authenticator interface {
	// Authenticate returns the principal of a request that carries a
	// valid bearer JWT or Basic project-token credentials, ErrNoAuth when it
	// carries none, or another error when they are invalid, expired or
	// revoked.
	Authenticate(r *http.Request) (*Principal, error)
	// Allows reports whether p may perform action ("pull" or "push") on
	// repository name ("<upstream>/<repo>").
	Allows(p *Principal, name, action string) bool
	// Challenge answers 401 with a Bearer challenge for scope (e.g.
	// "repository:ghcr.io/acme/app:pull") and a registry JSON error.
	Challenge(w http.ResponseWriter, r *http.Request, scope string, err error)
}
