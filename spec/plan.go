package spec

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/pullsecret/pullsecret/secret"
)

// How an image is pulled.
const (
	// ViaDirect pulls from the image's registry with the pull secret,
	// resolved at pull time by the credential helper.
	ViaDirect = "direct"
	// ViaProxy pulls through `pullsecret serve` with a short-lived project
	// pull token; the proxy applies the pull secret upstream.
	ViaProxy = "proxy"
)

// SecretsDir is where the runtime plan mounts each runtime secret: a
// folder per secret, one file per key.
const SecretsDir = "/run/secrets"

// Secrets is what planning needs from the pull secret store: metadata,
// never values. *secret.Store satisfies it.
type Secrets interface {
	Get(ctx context.Context, project, name string) (secret.Secret, error)
	List(ctx context.Context, project string) ([]secret.Secret, error)
}

// Options says how a spec is planned.
type Options struct {
	Project string // default secret.DefaultProject
	Via     string // ViaDirect (default) or ViaProxy
	// Proxy is the proxy's host[:port], for ViaProxy; the pull image becomes
	// PROXY/<upstream>/<repository>. Optional in a plan.
	Proxy string
	// UpstreamAlias is the name the proxy knows the image's registry by (an
	// alias of the server's config), in place of its host. A registry host
	// with a port needs one: an image reference cannot hold a port in a
	// path component.
	UpstreamAlias string
}

// Plan is a spec split in two: what is read while pulling, and what the
// running container gets. It holds names, never secret values.
type Plan struct {
	File     string       `json:"file"`
	Service  string       `json:"service"`
	Project  string       `json:"project"`
	Pull     PullPlan     `json:"pull"`
	Runtime  RuntimePlan  `json:"runtime"`
	Warnings []Diagnostic `json:"warnings,omitempty"`
}

// PullPlan is read while pulling, and only then.
type PullPlan struct {
	// Image is the image as the spec names it, fully qualified.
	Image      string `json:"image"`
	Registry   string `json:"registry"`   // canonical registry host, e.g. "ghcr.io", "docker.io"
	Repository string `json:"repository"` // e.g. "acme/agent", "library/alpine"
	Tag        string `json:"tag,omitempty"`
	Digest     string `json:"digest,omitempty"` // when the spec pins one
	// PullSecret is the image pull secret's name; "" for an anonymous pull.
	PullSecret string `json:"pull_secret,omitempty"`
	// SecretRegistry is the pull secret's registry pattern that covers the
	// image.
	SecretRegistry string `json:"secret_registry,omitempty"`
	Via            string `json:"via"`
	Proxy          string `json:"proxy,omitempty"`
	// Upstream is the first path component on the proxy: the registry host,
	// or its alias.
	Upstream string `json:"upstream,omitempty"`
	// PullImage is the reference the runtime pulls: Image, or its form on
	// the proxy.
	PullImage string `json:"pull_image"`
}

// RuntimePlan is what the running container gets. The image pull secret is
// never part of it.
type RuntimePlan struct {
	// Image is the image pinned by digest once pulled
	// ("ghcr.io/acme/agent@sha256:..."); before the pull, the image as named.
	Image       string        `json:"image"`
	Digest      string        `json:"digest,omitempty"`
	Pinned      bool          `json:"pinned"`
	Environment []EnvPlan     `json:"environment,omitempty"`
	Secrets     []SecretMount `json:"secrets,omitempty"`
}

// EnvPlan is one environment variable of the running container.
type EnvPlan struct {
	Name string `json:"name"`
	// Value is a literal value from the spec. A literal that looks like a
	// credential is left out and Redacted is set (the spec draws a warning).
	Value    *string       `json:"value,omitempty"`
	Redacted bool          `json:"redacted,omitempty"`
	Secret   *SecretKeyRef `json:"secret,omitempty"`
}

// SecretMount is a runtime secret delivered to the container as files.
type SecretMount struct {
	Name string `json:"name"`
	Path string `json:"path"` // SecretsDir/<name>, one file per key
}

// Target is the image's registry and repository, the way pull secrets match
// them.
func (p PullPlan) Target() secret.Target {
	return secret.Target{Host: p.Registry, Repo: p.Repository}
}

// Pin records the digest the runtime pulled: the runtime image becomes
// the pulled repository at that digest, <registry>/<repository>@<digest>
// (through the proxy, <proxy>/<upstream>/<repository>@<digest>: the name the
// runtime holds it under).
func (p *Plan) Pin(digest string) {
	p.Runtime.Digest = digest
	p.Runtime.Pinned = true
	repo := imageName(p.Pull.Registry, p.Pull.Repository)
	if p.Pull.Via == ViaProxy && p.Pull.Proxy != "" {
		repo = p.Pull.Proxy + "/" + p.Pull.Upstream + "/" + p.Pull.Repository
	}
	p.Runtime.Image = repo + "@" + digest
}

// imageName spells registry/repository the way clients do: Docker Hub
// images keep the "docker.io/" prefix so the name is unambiguous.
func imageName(registry, repo string) string { return registry + "/" + repo }

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// ParseImage parses an image reference and returns its canonical registry
// host (as pull secrets match it), repository, tag and digest.
func ParseImage(image string) (registry, repo, tag, digest string, err error) {
	ref, err := name.ParseReference(image)
	if err != nil {
		return "", "", "", "", err
	}
	t, err := secret.ParseServerURL(ref.Context().RegistryStr())
	if err != nil {
		return "", "", "", "", err
	}
	registry, repo = t.Host, ref.Context().RepositoryStr()
	switch r := ref.(type) {
	case name.Tag:
		tag = r.TagStr()
	case name.Digest:
		digest = r.DigestStr()
		// name.Digest drops a tag given with the digest; keep it for display.
		if before, _, ok := strings.Cut(image, "@"); ok {
			if t, err := name.NewTag(before, name.StrictValidation); err == nil {
				tag = t.TagStr()
			}
		}
	}
	return registry, repo, tag, digest, nil
}

// ProxyImage is the image's reference on the proxy:
// PROXY/<upstream>/<repository>[:tag][@digest].
func ProxyImage(proxy, upstream, repo, ref string) string {
	return proxy + "/" + upstream + "/" + repo + ref
}

// refSuffix is ":tag", "@digest" or ":tag@digest".
func refSuffix(tag, digest string) string {
	s := ""
	if tag != "" {
		s = ":" + tag
	}
	if digest != "" {
		s += "@" + digest
	}
	return s
}

// MakePlan checks a parsed spec against the project's pull secrets and
// splits it into a pull plan and a runtime plan. The error is an *Error
// listing every problem with its line, or another error when the store
// cannot be read. Warnings (literal values that look like credentials) are
// in the plan.
func MakePlan(ctx context.Context, s *Spec, store Secrets, o Options) (*Plan, error) {
	project := o.Project
	if project == "" {
		project = secret.DefaultProject
	}
	via := o.Via
	if via == "" {
		via = ViaDirect
	}
	d := &diags{file: s.File}
	warn := &diags{file: s.File}
	c := s.Container
	plan := &Plan{File: s.File, Service: s.Metadata.Name, Project: project}
	plan.Pull.Via = via
	plan.Pull.Image = c.Image
	plan.Pull.PullSecret = c.PullSecret

	if via != ViaDirect && via != ViaProxy {
		return nil, fmt.Errorf("via %q: want %s or %s", via, ViaDirect, ViaProxy)
	}

	registry, repo, tag, digest, err := ParseImage(c.Image)
	if err != nil {
		d.add(s.pos("container.image"), "container.image", "invalid image reference %q: %v", c.Image, err)
	} else {
		plan.Pull.Registry, plan.Pull.Repository, plan.Pull.Tag, plan.Pull.Digest = registry, repo, tag, digest
		plan.Pull.Image = imageName(registry, repo) + refSuffix(tag, digest)
		plan.Pull.PullImage = plan.Pull.Image
		if via == ViaProxy {
			plan.Pull.Proxy = o.Proxy
			upstream := registry
			if o.UpstreamAlias != "" {
				upstream = o.UpstreamAlias
			}
			if strings.ContainsAny(upstream, ":[]") {
				return nil, fmt.Errorf("the image's registry %s has a port, which an image reference on the proxy cannot hold (%s/%s/...): give the alias the server's config maps to it (--upstream-alias NAME)", registry, o.Proxy, upstream)
			}
			plan.Pull.Upstream = upstream
			if o.Proxy != "" {
				plan.Pull.PullImage = ProxyImage(o.Proxy, upstream, repo, refSuffix(tag, digest))
			}
		}
	}

	// The project's pull secrets, by name: a runtime reference to any of them
	// is an error.
	all, err := store.List(ctx, project)
	if err != nil {
		return nil, fmt.Errorf("read pull secrets of project %s: %w", project, err)
	}
	isPullSecret := func(n string) bool {
		return n == c.PullSecret || slices.ContainsFunc(all, func(x secret.Secret) bool { return x.Name == n })
	}

	if c.PullSecret != "" {
		checkPullSecret(ctx, d, s, store, all, project, plan)
	}

	plan.Runtime.Image = plan.Pull.Image
	if plan.Pull.Digest != "" {
		plan.Runtime.Image = imageName(plan.Pull.Registry, plan.Pull.Repository) + "@" + plan.Pull.Digest
		plan.Runtime.Digest = plan.Pull.Digest
		plan.Runtime.Pinned = true
	}
	if plan.Runtime.Image == "" {
		plan.Runtime.Image = c.Image
	}

	seenSecret := map[string]int{}
	for i, n := range c.Secrets {
		path := fmt.Sprintf("container.secrets[%d]", i)
		if n == "" {
			continue // already reported by the parser
		}
		if err := secret.ValidName(n); err != nil {
			d.add(s.pos(path), path, "%v", err)
			continue
		}
		if isPullSecret(n) {
			d.add(s.pos(path), path, "%q is an image pull secret of project %s: it is read while pulling only and is never delivered to the running container; use a project keys secret here", n, project)
			continue
		}
		if j, dup := seenSecret[n]; dup {
			d.add(s.pos(path), path, "secret %q listed twice (also container.secrets[%d])", n, j)
			continue
		}
		seenSecret[n] = i
		plan.Runtime.Secrets = append(plan.Runtime.Secrets, SecretMount{Name: n, Path: SecretsDir + "/" + n})
	}

	seenEnv := map[string]int{}
	for i, e := range c.Environment {
		path := fmt.Sprintf("container.environment[%d]", i)
		if e.Name == "" {
			continue // reported by the parser
		}
		if !envName.MatchString(e.Name) {
			d.add(s.pos(path+".name"), path+".name", "invalid environment variable name %q: use letters, digits and '_', not starting with a digit", e.Name)
			continue
		}
		if j, dup := seenEnv[e.Name]; dup {
			d.add(s.pos(path+".name"), path+".name", "%s is set twice (also container.environment[%d])", e.Name, j)
			continue
		}
		seenEnv[e.Name] = i
		ep := EnvPlan{Name: e.Name}
		if e.Secret != nil {
			ref := *e.Secret
			if ref.Name == "" || ref.Key == "" {
				continue // reported by the parser
			}
			if err := secret.ValidName(ref.Name); err != nil {
				d.add(s.pos(path+".secret.name"), path+".secret.name", "%v", err)
				continue
			}
			if isPullSecret(ref.Name) {
				d.add(s.pos(path+".secret.name"), path+".secret.name", "%q is an image pull secret of project %s: it is read while pulling only and is never a runtime value; reference a room or project keys secret instead", ref.Name, project)
				continue
			}
			ep.Secret = &ref
		} else {
			if bad, why := LooksLikeCredential(e.Name, e.Value); bad {
				warn.add(s.pos(path+".value"), path+".value", "the literal value of %s looks like a credential (%s): store it as a secret and reference it with secret: {name, key}; the plan leaves it out", e.Name, why)
				ep.Redacted = true
			} else {
				v := e.Value
				ep.Value = &v
			}
		}
		plan.Runtime.Environment = append(plan.Runtime.Environment, ep)
	}

	plan.Warnings = warn.list
	if err := d.err(); err != nil {
		e := err.(*Error)
		e.Warnings = warn.list
		return nil, e
	}
	return plan, nil
}

// checkPullSecret checks that the named pull secret exists in the project,
// covers the image, and is the secret that pull-time resolution picks for it
// (the longest matching registry pattern of the project wins).
func checkPullSecret(ctx context.Context, d *diags, s *Spec, store Secrets, all []secret.Secret, project string, plan *Plan) {
	const field = "container.pull_secret"
	p := s.pos(field)
	name := s.Container.PullSecret
	if err := secret.ValidName(name); err != nil {
		d.add(p, field, "%v", err)
		return
	}
	sec, err := store.Get(ctx, project, name)
	if errors.Is(err, secret.ErrNotFound) {
		msg := fmt.Sprintf("pull secret %q does not exist in project %s", name, project)
		if plan.Pull.Registry != "" {
			if w, _, ok := winner(all, plan.Pull.Target()); ok {
				msg += fmt.Sprintf(" (secret %q of this project covers %s)", w.Name, plan.Pull.Target())
			}
		}
		d.add(p, field, "%s", msg)
		return
	}
	if err != nil {
		d.add(p, field, "pull secret %q: %v", name, err)
		return
	}
	if plan.Pull.Registry == "" {
		return // the image is invalid, already reported
	}
	t := plan.Pull.Target()
	best, score := secret.Pattern(""), 0
	for _, pat := range sec.Registries {
		if sc := pat.Match(t); sc > score {
			best, score = pat, sc
		}
	}
	if score == 0 {
		regs := make([]string, len(sec.Registries))
		for i, r := range sec.Registries {
			regs[i] = string(r)
		}
		d.add(p, field, "pull secret %q covers %s, not the image's registry %s", name, strings.Join(regs, ", "), t)
		return
	}
	plan.Pull.SecretRegistry = string(best)
	if w, wp, ok := winner(all, t); ok && w.Name != sec.Name {
		d.add(p, field, "pull secret %q covers %s through %s, but secret %q covers it more closely through %s and is the one used at pull time: name %q here, or narrow %q", name, t, best, w.Name, wp, w.Name, w.Name)
	}
}

// winner is the secret pull-time resolution picks for t: the longest
// matching pattern of the project.
func winner(all []secret.Secret, t secret.Target) (secret.Secret, secret.Pattern, bool) {
	var best secret.Secret
	var bestP secret.Pattern
	score := 0
	for _, s := range all {
		for _, p := range s.Registries {
			if sc := p.Match(t); sc > score {
				best, bestP, score = s, p, sc
			}
		}
	}
	return best, bestP, score > 0
}

// HostOnlyWinner is the secret the credential helper resolves when a client
// names only the registry host, as Docker and podman do: a whole-registry
// pattern, else the one secret covering part of the host. It reports "" and
// an explanation when the host alone is ambiguous or uncovered.
func HostOnlyWinner(all []secret.Secret, host string) (string, string) {
	t := secret.Target{Host: host}
	if w, _, ok := winner(all, t); ok {
		return w.Name, ""
	}
	var partial []string
	for _, s := range all {
		for _, p := range s.Registries {
			if p.Host() == host && !slices.Contains(partial, s.Name) {
				partial = append(partial, s.Name)
			}
		}
	}
	switch len(partial) {
	case 0:
		return "", "no pull secret covers " + host
	case 1:
		return partial[0], ""
	}
	return "", fmt.Sprintf("secrets %s each cover part of %s", strings.Join(partial, ", "), host)
}
