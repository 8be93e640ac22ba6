package proxy

// Naming: how a request path becomes an upstream registry and a repository
// on it, through the project's allowlist only.
//
// Two forms reach the same place:
//
//	path prefix:  /v2/<upstream>/<repo>/manifests/<ref>
//	mirror (ns=): /v2/<repo>/manifests/<ref>?ns=<upstream>   (containerd)
//
// <upstream> is either the registry host[:port] of one of the project's
// pull secrets (secret.Store.List → patterns → hosts) or an alias the
// operator configured (global or for the project). Nothing else reaches the
// network: a host named by a client but absent from the allowlist is
// refused before any lookup.
//
// The repository name used for authorization (Authenticator.Allows and the
// scope of a challenge) is the name as the client wrote it: "<first path
// component>/<rest>" in path-prefix mode, "<ns>/<path>" in mirror mode. That
// is what clients put in the scopes they ask the token server for.

import (
	"context"
	"net/http"
	"regexp"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/pullsecret/pullsecret/secret"
)

// Target is what an upstream request is for: whose pull secret, which
// upstream registry, which repository on it.
type Target struct {
	Project  string // the project whose pull secret is used
	Upstream string // canonical upstream host[:port], e.g. "ghcr.io", "docker.io"
	Repo     string // repository on the upstream, e.g. "acme/app", "library/alpine"
}

// String is "<upstream>/<repo>".
func (t Target) String() string { return t.Upstream + "/" + t.Repo }

type routeKind int

const (
	routeManifest routeKind = iota + 1
	routeBlob
	routeUploadStart
	routeUpload
	routeTags
	routeReferrers
)

func (k routeKind) String() string {
	switch k {
	case routeManifest:
		return "manifest"
	case routeBlob:
		return "blob"
	case routeUploadStart, routeUpload:
		return "upload"
	case routeTags:
		return "tags"
	case routeReferrers:
		return "referrers"
	}
	return "other"
}

// route is a parsed registry API request.
type route struct {
	kind routeKind
	// name is the repository as the client names it on the proxy; the
	// authorization name.
	name string
	// path is the repository path of the URL (without ns: the whole name).
	path string
	// key is the component naming the upstream: the first path component,
	// or the ns= value.
	key string
	// rest is the repository below key: the path after its first component,
	// or the whole path in mirror mode.
	rest string
	ns   bool
	// ref is the tag or digest of a manifest, the digest of a blob or of a
	// referrers subject, or an upload id.
	ref    string
	digest v1.Hash // set when ref is a digest
}

const maxNameLength = 255

var tagRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)

// parseRoute parses a /v2/ request path (not /v2/ itself). self is the
// proxy's own host, so that ns=<self> means the path-prefix form.
func parseRoute(r *http.Request, self string) (*route, *Error) {
	p := r.URL.EscapedPath()
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return nil, notFound()
	}
	if strings.Contains(rest, "%") {
		return nil, newError(http.StatusBadRequest, CodeNameInvalid, "escaped characters are not allowed in repository names")
	}
	rt := &route{}
	switch {
	case strings.HasSuffix(rest, "/blobs/uploads/"):
		rt.kind, rt.path = routeUploadStart, strings.TrimSuffix(rest, "/blobs/uploads/")
	case strings.HasSuffix(rest, "/blobs/uploads"):
		rt.kind, rt.path = routeUploadStart, strings.TrimSuffix(rest, "/blobs/uploads")
	case strings.HasSuffix(rest, "/tags/list"):
		rt.kind, rt.path = routeTags, strings.TrimSuffix(rest, "/tags/list")
	default:
		i := strings.LastIndexByte(rest, '/')
		if i < 0 {
			return nil, notFound()
		}
		before, last := rest[:i], rest[i+1:]
		switch {
		case strings.HasSuffix(before, "/manifests"):
			rt.kind, rt.path = routeManifest, strings.TrimSuffix(before, "/manifests")
		case strings.HasSuffix(before, "/blobs/uploads"):
			rt.kind, rt.path = routeUpload, strings.TrimSuffix(before, "/blobs/uploads")
		case strings.HasSuffix(before, "/blobs"):
			rt.kind, rt.path = routeBlob, strings.TrimSuffix(before, "/blobs")
		case strings.HasSuffix(before, "/referrers"):
			rt.kind, rt.path = routeReferrers, strings.TrimSuffix(before, "/referrers")
		default:
			return nil, notFound()
		}
		rt.ref = last
	}
	if err := rt.parseRef(); err != nil {
		return nil, err
	}
	ns := r.URL.Query().Get("ns")
	if ns != "" && !strings.EqualFold(ns, self) {
		rt.ns = true
		rt.key = strings.ToLower(ns)
		rt.rest = rt.path
		if err := validRepoPath(rt.rest); err != nil {
			return nil, err
		}
		if err := validUpstreamKey(rt.key); err != nil {
			return nil, err
		}
		rt.name = rt.key + "/" + rt.rest
	} else {
		first, after, ok := strings.Cut(rt.path, "/")
		if !ok || after == "" {
			return nil, newError(http.StatusBadRequest, CodeNameInvalid, "repository name must be <upstream>/<repository> (or use ?ns=<upstream>), got %q", printableName(rt.path))
		}
		if err := validUpstreamKey(first); err != nil {
			return nil, err
		}
		if err := validRepoPath(after); err != nil {
			return nil, err
		}
		rt.key, rt.rest, rt.name = first, after, rt.path
	}
	if len(rt.name) > maxNameLength {
		return nil, newError(http.StatusBadRequest, CodeNameInvalid, "repository name longer than %d characters", maxNameLength)
	}
	return rt, nil
}

func (rt *route) parseRef() *Error {
	switch rt.kind {
	case routeManifest:
		if strings.Contains(rt.ref, ":") {
			d, err := v1.NewHash(rt.ref)
			if err != nil {
				return newError(http.StatusBadRequest, CodeDigestInvalid, "invalid digest %q", printableName(rt.ref))
			}
			rt.digest = d
		} else if !tagRE.MatchString(rt.ref) {
			return newError(http.StatusBadRequest, "TAG_INVALID", "invalid tag %q", printableName(rt.ref))
		}
	case routeBlob, routeReferrers:
		d, err := v1.NewHash(rt.ref)
		if err != nil {
			return newError(http.StatusBadRequest, CodeDigestInvalid, "invalid digest %q", printableName(rt.ref))
		}
		rt.digest = d
	case routeUpload:
		if rt.ref == "" || len(rt.ref) > 4096 {
			return newError(http.StatusNotFound, CodeBlobUploadUnknown, "upload unknown")
		}
	}
	return nil
}

func notFound() *Error {
	return newError(http.StatusNotFound, CodeUnsupported, "not a registry API endpoint this proxy serves")
}

// validUpstreamKey checks the component naming an upstream: a registry
// host[:port] or an alias, lower case.
func validUpstreamKey(k string) *Error {
	if k == "" || len(k) > 255 {
		return newError(http.StatusBadRequest, CodeNameInvalid, "missing upstream registry")
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_' || c == ':' || c == '[' || c == ']') {
			return newError(http.StatusBadRequest, CodeNameInvalid, "invalid upstream registry %q: use a lower-case host[:port] or an alias", printableName(k))
		}
	}
	return nil
}

// validRepoPath checks a repository path against the distribution grammar:
// components of [a-z0-9]+ joined by ".", "_", "__" or runs of "-",
// separated by "/". No "..", no empty component, no upper case.
func validRepoPath(path string) *Error {
	if path == "" {
		return newError(http.StatusBadRequest, CodeNameInvalid, "empty repository name")
	}
	if len(path) > maxNameLength {
		return newError(http.StatusBadRequest, CodeNameInvalid, "repository name longer than %d characters", maxNameLength)
	}
	for _, c := range strings.Split(path, "/") {
		if !secret.ValidComponent(c) {
			return newError(http.StatusBadRequest, CodeNameInvalid, "invalid repository name %q: components are lower-case letters and digits separated by '.', '_', '__' or '-'", printableName(path))
		}
	}
	return nil
}

// printableName keeps client input short and printable in a message.
func printableName(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '?'
		}
		return r
	}, s)
	if len(s) > 100 {
		s = s[:100] + "..."
	}
	return s
}

// SecretSource is what the proxy needs of the sealed store: the project's
// secrets (for the allowlist) and pull-time resolution. *secret.Store
// satisfies it.
type SecretSource interface {
	List(ctx context.Context, project string) ([]secret.Secret, error)
	Resolve(ctx context.Context, project string, t secret.Target) (secret.Secret, secret.Credential, error)
}

// Allowlist is a project's reachable upstreams.
type Allowlist struct {
	Hosts   map[string]bool   // hosts of the project's pull secrets
	Aliases map[string]string // alias -> host (project's over global)

	project string
	secrets []secret.Secret // the project's, without values
}

// allowlist builds project's allowlist from its secrets and the
// configured aliases.
func (s *Server) allowlist(ctx context.Context, project string) (*Allowlist, error) {
	return buildAllowlist(ctx, s.cfg, s.secrets, project)
}

func buildAllowlist(ctx context.Context, cfg Config, secrets SecretSource, project string) (*Allowlist, error) {
	secs, err := secrets.List(ctx, project)
	if err != nil {
		return nil, err
	}
	a := &Allowlist{Hosts: map[string]bool{}, Aliases: map[string]string{}, project: project}
	for _, sec := range secs {
		if sec.Project != project {
			continue
		}
		a.secrets = append(a.secrets, sec)
		for _, p := range sec.Registries {
			a.Hosts[p.Host()] = true
		}
	}
	// An alias's target is reachable under its own name too (containerd
	// sends ns=<target host>).
	for k, v := range cfg.Aliases {
		a.Aliases[k] = v
		a.Hosts[v] = true
	}
	if pc, ok := cfg.Projects[project]; ok {
		for k, v := range pc.Aliases {
			a.Aliases[k] = v
			a.Hosts[v] = true
		}
	}
	return a, nil
}

// AllowlistFilter is the token server's repository filter matching the
// proxy's routing: a repository name "<upstream-or-alias>/<repo>" may be
// granted to a project when its first component is on the project's
// allowlist (a host of one of its pull secrets, or an alias).
func AllowlistFilter(cfg Config, secrets SecretSource) RepositoryFilter {
	return func(ctx context.Context, project, name string) bool {
		key, rest, ok := strings.Cut(name, "/")
		if !ok || validUpstreamKey(key) != nil || validRepoPath(rest) != nil {
			return false
		}
		a, err := buildAllowlist(ctx, cfg, secrets, project)
		if err != nil {
			return false
		}
		_, ok = a.Upstream(key)
		return ok
	}
}

// Upstream maps key (a first path component or an ns= value) to an
// upstream host, or reports false if the project may not reach it.
func (a *Allowlist) Upstream(key string) (string, bool) {
	if h, ok := a.Aliases[key]; ok {
		return h, true
	}
	t, err := secret.ParseServerURL(key)
	if err != nil || t.Repo != "" || strings.Contains(key, "/") {
		return "", false
	}
	if a.Hosts[t.Host] {
		return t.Host, true
	}
	return "", false
}

// target resolves a parsed route for the principal's project.
func (s *Server) target(ctx context.Context, p *Principal, rt *route) (Target, *Error) {
	a, err := s.allowlist(ctx, p.Project)
	if err != nil {
		return Target{}, newError(http.StatusServiceUnavailable, CodeUnavailable, "the secret store cannot be read").withCause(err)
	}
	host, ok := a.Upstream(rt.key)
	if !ok {
		return Target{}, newError(http.StatusForbidden, CodeDenied, "%s is not an upstream of project %s: add a pull secret for that registry, or ask the operator for an alias", printableName(rt.key), p.Project)
	}
	t := Target{Project: p.Project, Upstream: host, Repo: upstreamRepo(host, rt.rest)}
	if info := infoFrom(ctx); info != nil {
		info.secret = a.SecretFor(t)
	}
	return t, nil
}

// SecretFor names the project's pull secret that covers t, the one its
// upstream requests carry; "" when none does (anonymous pulls).
func (a *Allowlist) SecretFor(t Target) string {
	sec, err := secret.MatchSecret(a.secrets, a.project, secret.Target{Host: t.Upstream, Repo: t.Repo})
	if err != nil {
		return ""
	}
	return sec.Name
}

// upstreamRepo applies Docker Hub's rule: a one-component repository is an
// official image under library/.
func upstreamRepo(host, repo string) string {
	if host == secret.DockerHub && !strings.Contains(repo, "/") {
		return "library/" + repo
	}
	return repo
}
