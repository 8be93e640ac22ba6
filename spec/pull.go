package spec

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/pullsecret/pullsecret/secret"
)

// Runtimes that `spec pull` drives.
const (
	RuntimeDocker     = "docker"
	RuntimePodman     = "podman"
	RuntimeContainerd = "containerd"
	RuntimeOCILayout  = "oci-layout"
)

// HelperName is the credential helper's program; clients find it on PATH
// from the suffix "pullsecret" in credHelpers.
const HelperName = "docker-credential-pullsecret"

// Runtime is what pulls: a container runtime on this machine, or an OCI
// image layout folder.
type Runtime struct {
	Kind string
	Dir  string // for RuntimeOCILayout
}

func (r Runtime) String() string {
	if r.Kind == RuntimeOCILayout {
		return r.Kind + ":" + r.Dir
	}
	return r.Kind
}

// ParseRuntime parses docker, podman, containerd or oci-layout:DIR.
func ParseRuntime(s string) (Runtime, error) {
	switch s {
	case RuntimeDocker, RuntimePodman, RuntimeContainerd:
		return Runtime{Kind: s}, nil
	}
	if dir, ok := strings.CutPrefix(s, RuntimeOCILayout+":"); ok {
		if dir == "" {
			return Runtime{}, errors.New("runtime oci-layout:DIR needs a folder")
		}
		return Runtime{Kind: RuntimeOCILayout, Dir: dir}, nil
	}
	return Runtime{}, fmt.Errorf("runtime %q: want docker, podman, containerd or oci-layout:DIR", s)
}

// PullOptions says how Pull pulls.
type PullOptions struct {
	Runtime Runtime
	// Store resolves the pull secret at pull time (for containerd and
	// oci-layout; docker and podman call the credential helper, which
	// resolves it from the same store).
	Store *secret.Store
	// Env is the environment of runtime commands and of the helper they
	// run (default os.Environ()). DOCKER_HOST, CONTAINERD_ADDRESS,
	// CONTAINERS_STORAGE_CONF and the like pass through. PULLSECRET_DOCKER,
	// PULLSECRET_PODMAN and PULLSECRET_CTR name the runtime programs
	// (default: docker, podman and ctr on PATH).
	Env []string
	// HelperDir holds docker-credential-pullsecret; default: the folder of
	// the running program if it is there, else PATH.
	HelperDir string
	// Insecure allows plain HTTP and unverified TLS to the registry or the
	// proxy.
	Insecure bool
	// Token is the project pull token for ViaProxy; the proxy is the plan's
	// Pull.Proxy, and ProxyScheme ("http" or "https") how to reach it.
	Token       string
	ProxyScheme string
	// Progress receives the runtime's own output (default io.Discard).
	Progress io.Writer
	// TempDir is where temporary configuration goes (default os.TempDir()).
	TempDir string
}

func (o *PullOptions) getenv(k string) string {
	for i := len(o.Env) - 1; i >= 0; i-- {
		if key, v, ok := strings.Cut(o.Env[i], "="); ok && key == k {
			return v
		}
	}
	return ""
}

// Pull pulls the plan's image now with the runtime, handing the runtime the
// pull secret (or, via the proxy, a pull token) through temporary
// configuration that is removed before Pull returns, and pins the plan's
// runtime image to the digest pulled.
func Pull(ctx context.Context, plan *Plan, o PullOptions) (err error) {
	if o.Env == nil {
		o.Env = os.Environ()
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if plan.Pull.Registry == "" {
		return errors.New("the plan has no image")
	}
	if plan.Pull.Via == ViaProxy {
		if plan.Pull.Proxy == "" {
			return errors.New("pulling via the proxy needs the server's URL (--server or PULLSECRET_SERVER)")
		}
		if o.Token == "" {
			return errors.New("pulling via the proxy needs a project pull token (PULLSECRET_TOKEN, PULLSECRET_TOKEN_FILE or --token-file)")
		}
		if o.ProxyScheme == "" {
			o.ProxyScheme = "https"
		}
	}
	tmp, err := os.MkdirTemp(o.TempDir, "pullsecret-pull-")
	if err != nil {
		return err
	}
	// Every temporary file (client config, auth header) lives in tmp.
	defer func() {
		if rerr := os.RemoveAll(tmp); rerr != nil && err == nil {
			err = fmt.Errorf("remove temporary folder %s: %w", tmp, rerr)
		}
	}()
	if err := os.Chmod(tmp, 0o700); err != nil {
		return err
	}
	p := &puller{plan: plan, o: &o, tmp: tmp}
	var digest string
	switch o.Runtime.Kind {
	case RuntimeDocker:
		digest, err = p.docker(ctx)
	case RuntimePodman:
		digest, err = p.podman(ctx)
	case RuntimeContainerd:
		digest, err = p.containerd(ctx)
	case RuntimeOCILayout:
		digest, err = p.ociLayout(ctx)
	default:
		return fmt.Errorf("runtime %q: want docker, podman, containerd or oci-layout:DIR", o.Runtime.Kind)
	}
	if err != nil {
		return err
	}
	if _, err := v1.NewHash(digest); err != nil {
		return fmt.Errorf("%s reported digest %q for %s: %v", o.Runtime, digest, plan.Pull.PullImage, err)
	}
	if plan.Pull.Digest != "" && digest != plan.Pull.Digest {
		return fmt.Errorf("%s pulled %s for %s, not the digest the spec pins (%s)", o.Runtime, digest, plan.Pull.PullImage, plan.Pull.Digest)
	}
	plan.Pin(digest)
	return nil
}

type puller struct {
	plan *Plan
	o    *PullOptions
	tmp  string
}

// proxyUser is the user name sent with a project token; the proxy reads
// the token only.
const proxyUser = "pullsecret"

// checkHelperResolution makes sure the helper, asked for the registry host
// alone (as Docker and podman ask), resolves the plan's pull secret.
func (p *puller) checkHelperResolution(ctx context.Context) error {
	if p.o.Store == nil {
		return errors.New("no pull secret store")
	}
	all, err := p.o.Store.List(ctx, p.plan.Project)
	if err != nil {
		return err
	}
	w, why := HostOnlyWinner(all, p.plan.Pull.Registry)
	if w != p.plan.Pull.PullSecret {
		if why == "" {
			why = fmt.Sprintf("secret %q covers the whole of %s", w, p.plan.Pull.Registry)
		}
		return fmt.Errorf("%s asks the credential helper for the registry host %s alone, and in project %s %s: the helper could not pick pull secret %q (pull with --runtime containerd or oci-layout:DIR, or via the proxy)",
			p.o.Runtime, p.plan.Pull.Registry, p.plan.Project, why, p.plan.Pull.PullSecret)
	}
	return nil
}

// helperEnv is the runtime's environment with the helper on PATH and the
// plan's project selected.
func (p *puller) helperEnv(extra ...string) ([]string, error) {
	dir := p.o.HelperDir
	if dir == "" {
		var err error
		if dir, err = FindHelperDir(); err != nil {
			return nil, err
		}
	}
	path := dir
	if old := p.o.getenv("PATH"); old != "" {
		path += string(os.PathListSeparator) + old
	}
	return mergeEnv(p.o.Env, append([]string{"PATH=" + path, "PULLSECRET_PROJECT=" + p.plan.Project}, extra...)), nil
}

// FindHelperDir finds docker-credential-pullsecret: next to the running
// program, else on PATH.
func FindHelperDir() (string, error) {
	if self, err := os.Executable(); err == nil {
		if real, err := filepath.EvalSymlinks(self); err == nil {
			self = real
		}
		if isExecutable(filepath.Join(filepath.Dir(self), HelperName)) {
			return filepath.Dir(self), nil
		}
	}
	p, err := exec.LookPath(HelperName)
	if err != nil {
		return "", fmt.Errorf("%s is neither next to this program nor on PATH", HelperName)
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	return filepath.Dir(abs), nil
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// writeJSON writes a temporary file, 0600.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o600)
}

// clientConfig is a Docker config.json / containers auth.json.
type clientConfig struct {
	Auths       map[string]clientAuth `json:"auths"`
	CredHelpers map[string]string     `json:"credHelpers,omitempty"`
}

type clientAuth struct {
	Auth string `json:"auth"`
}

// proxyHost is the proxy's host[:port] as clients name it.
func (p *puller) proxyHost() string { return p.plan.Pull.Proxy }

// config is the client configuration for the pull: the helper for the
// image's registry (direct), a Basic login with the pull token for the
// proxy (via proxy), or nothing (anonymous).
func (p *puller) config(ctx context.Context, docker bool) (clientConfig, []string, error) {
	cfg := clientConfig{Auths: map[string]clientAuth{}}
	if p.plan.Pull.Via == ViaProxy {
		cfg.Auths[p.proxyHost()] = clientAuth{Auth: base64.StdEncoding.EncodeToString([]byte(proxyUser + ":" + p.o.Token))}
		return cfg, mergeEnv(p.o.Env, nil), nil
	}
	if p.plan.Pull.PullSecret == "" {
		return cfg, mergeEnv(p.o.Env, nil), nil
	}
	if err := p.checkHelperResolution(ctx); err != nil {
		return cfg, nil, err
	}
	env, err := p.helperEnv()
	if err != nil {
		return cfg, nil, err
	}
	cfg.CredHelpers = map[string]string{p.plan.Pull.Registry: "pullsecret"}
	if p.plan.Pull.Registry == secret.DockerHub && docker {
		// Docker CLI looks Docker Hub up under its v1 index URL.
		cfg.CredHelpers["https://index.docker.io/v1/"] = "pullsecret"
	}
	return cfg, env, nil
}

func (p *puller) docker(ctx context.Context) (string, error) {
	cfg, env, err := p.config(ctx, true)
	if err != nil {
		return "", err
	}
	if err := writeJSON(filepath.Join(p.tmp, "config.json"), cfg); err != nil {
		return "", err
	}
	env = mergeEnv(env, []string{"DOCKER_CONFIG=" + p.tmp})
	prog := p.program("PULLSECRET_DOCKER", "docker")
	ref := p.plan.Pull.PullImage
	if _, err := p.run(ctx, env, prog, "pull", ref); err != nil {
		return "", err
	}
	out, err := p.run(ctx, env, prog, "image", "inspect", "--format", "{{json .RepoDigests}}", ref)
	if err != nil {
		return "", err
	}
	var digests []string
	if err := json.Unmarshal(bytes.TrimSpace(out), &digests); err != nil {
		return "", fmt.Errorf("docker image inspect %s: unexpected output", ref)
	}
	return repoDigest(ref, digests)
}

// repoDigest picks the digest of ref's repository from RepoDigests
// ("repo@sha256:...").
func repoDigest(ref string, digests []string) (string, error) {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return "", err
	}
	want := r.Context().Name()
	for _, d := range digests {
		repo, dg, ok := strings.Cut(d, "@")
		if !ok {
			continue
		}
		if rr, err := name.NewRepository(repo, name.Insecure); err == nil && rr.Name() == want {
			return dg, nil
		}
	}
	if len(digests) == 1 {
		if _, dg, ok := strings.Cut(digests[0], "@"); ok {
			return dg, nil
		}
	}
	return "", fmt.Errorf("the runtime reports no digest for %s", ref)
}

func (p *puller) podman(ctx context.Context) (string, error) {
	cfg, env, err := p.config(ctx, false)
	if err != nil {
		return "", err
	}
	auth := filepath.Join(p.tmp, "auth.json")
	if err := writeJSON(auth, cfg); err != nil {
		return "", err
	}
	env = mergeEnv(env, []string{"REGISTRY_AUTH_FILE=" + auth})
	prog := p.program("PULLSECRET_PODMAN", "podman")
	ref := p.plan.Pull.PullImage
	args := []string{"pull", "--authfile", auth}
	if p.o.Insecure {
		args = append(args, "--tls-verify=false")
	}
	if _, err := p.run(ctx, env, prog, append(args, ref)...); err != nil {
		return "", err
	}
	out, err := p.run(ctx, env, prog, "image", "inspect", "--format", "{{.Digest}}", ref)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(out)), nil
}

// credential resolves the plan's pull secret now, checking that the
// resolution picks the secret the spec names.
func (p *puller) credential(ctx context.Context) (*secret.Credential, error) {
	if p.plan.Pull.Via == ViaProxy {
		return &secret.Credential{Username: proxyUser, Password: p.o.Token}, nil
	}
	if p.plan.Pull.PullSecret == "" {
		return nil, nil
	}
	if p.o.Store == nil {
		return nil, errors.New("no pull secret store")
	}
	sec, c, err := p.o.Store.Resolve(ctx, p.plan.Project, p.plan.Pull.Target())
	if err != nil {
		return nil, err
	}
	if sec.Name != p.plan.Pull.PullSecret {
		return nil, fmt.Errorf("at pull time %s resolves to pull secret %q, not %q", p.plan.Pull.Target(), sec.Name, p.plan.Pull.PullSecret)
	}
	return &c, nil
}

// pullHost is the registry the runtime talks to: the image's, or the
// proxy.
func (p *puller) pullHost() string {
	if p.plan.Pull.Via == ViaProxy {
		return p.proxyHost()
	}
	return p.plan.Pull.Registry
}

// refParts splits the runtime's reference into repository and tag/digest.
func (p *puller) pullRef() (name.Reference, error) {
	opts := []name.Option{}
	if p.o.Insecure || (p.plan.Pull.Via == ViaProxy && p.o.ProxyScheme == "http") {
		opts = append(opts, name.Insecure)
	}
	return name.ParseReference(p.plan.Pull.PullImage, opts...)
}

func (p *puller) transport() http.RoundTripper {
	t := http.DefaultTransport.(*http.Transport).Clone()
	if p.o.Insecure {
		t.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // --insecure asked for it
	}
	return t
}

func authenticator(c *secret.Credential) authn.Authenticator {
	if c == nil {
		return authn.Anonymous
	}
	return authn.FromConfig(authn.AuthConfig{Username: c.Username, Password: c.Password, IdentityToken: c.IdentityToken})
}

// containerd writes a hosts.toml for the registry (or the proxy) into a
// temporary --hosts-dir: ctr calls no credential helper, and a password on
// its command line would show in the process list. The header holds a
// registry bearer token for this repository when the registry uses token
// auth (what a client would send), or the Basic credential otherwise.
func (p *puller) containerd(ctx context.Context) (string, error) {
	c, err := p.credential(ctx)
	if err != nil {
		return "", err
	}
	ref, err := p.pullRef()
	if err != nil {
		return "", err
	}
	scheme, header, err := p.handshake(ctx, ref, c)
	if err != nil {
		return "", err
	}
	host := p.pullHost()
	server := scheme + "://" + host
	if host == secret.DockerHub {
		server = "https://registry-1.docker.io"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "server = %s\n\n[host.%s]\n  capabilities = [\"pull\", \"resolve\"]\n", strconv.Quote(server), strconv.Quote(server))
	if p.o.Insecure && scheme == "https" {
		b.WriteString("  skip_verify = true\n")
	}
	if header != "" {
		fmt.Fprintf(&b, "  [host.%s.header]\n    Authorization = [%s]\n", strconv.Quote(server), strconv.Quote(header))
	}
	hostsDir := filepath.Join(p.tmp, "hosts")
	if err := os.MkdirAll(filepath.Join(hostsDir, host), 0o700); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(hostsDir, host, "hosts.toml"), []byte(b.String()), 0o600); err != nil {
		return "", err
	}
	prog := p.program("PULLSECRET_CTR", "ctr")
	env := mergeEnv(p.o.Env, nil)
	name := p.plan.Pull.PullImage
	if _, err := p.run(ctx, env, prog, "images", "pull", "--hosts-dir", hostsDir, name); err != nil {
		return "", err
	}
	out, err := p.run(ctx, env, prog, "images", "ls")
	if err != nil {
		return "", err
	}
	return ctrDigest(string(out), name, ref)
}

// ctrDigest finds an image's digest in `ctr images ls` output (REF TYPE
// DIGEST ...).
func ctrDigest(out, given string, ref name.Reference) (string, error) {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || !strings.HasPrefix(f[2], "sha256:") {
			continue
		}
		if f[0] == given || f[0] == ref.Name() {
			return f[2], nil
		}
	}
	return "", fmt.Errorf("ctr images ls does not list %s", given)
}

// handshake authenticates to the registry the way a client does and
// returns its scheme and the Authorization header of a request that read
// the manifest ("" for an anonymous pull).
func (p *puller) handshake(ctx context.Context, ref name.Reference, c *secret.Credential) (string, string, error) {
	reg := ref.Context().Registry
	capture := &captureTransport{inner: p.transport(), host: reg.RegistryStr()}
	rt, err := transport.NewWithContext(ctx, reg, authenticator(c), capture, []string{ref.Context().Scope(transport.PullScope)})
	if err != nil {
		return "", "", fmt.Errorf("authenticate to %s: %w", reg.RegistryStr(), err)
	}
	capture.reset()
	u := url.URL{Scheme: capture.scheme, Host: reg.RegistryStr(), Path: "/v2/" + ref.Context().RepositoryStr() + "/manifests/" + ref.Identifier()}
	if u.Scheme == "" {
		u.Scheme = reg.Scheme()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, u.String(), nil)
	if err != nil {
		return "", "", err
	}
	req.Header.Set("Accept", strings.Join([]string{
		"application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
		"application/vnd.docker.distribution.manifest.list.v2+json", "application/vnd.docker.distribution.manifest.v2+json",
	}, ", "))
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return "", "", fmt.Errorf("%s: %w", reg.RegistryStr(), err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", "", fmt.Errorf("%s: reading the manifest of %s: %s", reg.RegistryStr(), ref, resp.Status)
	}
	if c == nil {
		return capture.scheme, "", nil
	}
	return capture.scheme, capture.auth, nil
}

// captureTransport remembers the scheme and Authorization header of the
// last request to host.
type captureTransport struct {
	inner  http.RoundTripper
	host   string
	scheme string
	auth   string
}

func (c *captureTransport) reset() { c.auth = "" }

func (c *captureTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Host == c.host && strings.HasPrefix(r.URL.Path, "/v2/") {
		c.scheme = r.URL.Scheme
		c.auth = r.Header.Get("Authorization")
	}
	return c.inner.RoundTrip(r)
}

// ociLayout pulls with go-containerregistry into an OCI image layout.
func (p *puller) ociLayout(ctx context.Context) (string, error) {
	c, err := p.credential(ctx)
	if err != nil {
		return "", err
	}
	ref, err := p.pullRef()
	if err != nil {
		return "", err
	}
	opts := []remote.Option{remote.WithContext(ctx), remote.WithAuth(authenticator(c)), remote.WithTransport(p.transport())}
	desc, err := remote.Get(ref, opts...)
	if err != nil {
		return "", fmt.Errorf("pull %s: %w", ref, err)
	}
	dir := p.o.Runtime.Dir
	path, err := layout.FromPath(dir)
	if err != nil {
		if path, err = layout.Write(dir, empty.Index); err != nil {
			return "", fmt.Errorf("OCI layout %s: %w", dir, err)
		}
	}
	ann := layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": imageName(p.plan.Pull.Registry, p.plan.Pull.Repository) + refSuffix(p.plan.Pull.Tag, ""),
	})
	if desc.MediaType.IsIndex() {
		idx, err := desc.ImageIndex()
		if err != nil {
			return "", err
		}
		if err := path.AppendIndex(idx, ann); err != nil {
			return "", fmt.Errorf("OCI layout %s: %w", dir, err)
		}
	} else {
		img, err := desc.Image()
		if err != nil {
			return "", err
		}
		if err := path.AppendImage(img, ann); err != nil {
			return "", fmt.Errorf("OCI layout %s: %w", dir, err)
		}
	}
	fmt.Fprintf(p.o.Progress, "pulled %s into %s\n", ref, dir)
	return desc.Digest.String(), nil
}

// program is the runtime program: $envKey, else def on PATH.
func (p *puller) program(envKey, def string) string {
	if v := p.o.getenv(envKey); v != "" {
		return v
	}
	return def
}

// runTimeout bounds one runtime command.
const runTimeout = 15 * time.Minute

// run runs a runtime command; its stderr goes to Progress, and its stdout
// too unless it is wanted (the caller parses it).
func (p *puller) run(ctx context.Context, env []string, prog string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, runTimeout)
	defer cancel()
	path, err := lookPath(prog, env)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = env
	cmd.Dir = p.tmp
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = io.MultiWriter(&stderr, p.o.Progress)
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 2000 {
			msg = "..." + msg[len(msg)-2000:]
		}
		if msg != "" {
			msg = ": " + msg
		}
		return nil, fmt.Errorf("%s %s: %v%s", filepath.Base(prog), strings.Join(args[:min(2, len(args))], " "), err, msg)
	}
	if args[0] == "pull" || (len(args) > 1 && args[1] == "pull") {
		p.o.Progress.Write(stdout.Bytes())
	}
	return stdout.Bytes(), nil
}

// lookPath finds prog on the PATH of env.
func lookPath(prog string, env []string) (string, error) {
	if strings.Contains(prog, "/") {
		return prog, nil
	}
	path := ""
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		if c := filepath.Join(dir, prog); isExecutable(c) {
			return c, nil
		}
	}
	return "", fmt.Errorf("%s not found on PATH", prog)
}

// mergeEnv returns base with each KEY=VALUE of extra replacing the same
// KEY.
func mergeEnv(base, extra []string) []string {
	out := make([]string, 0, len(base)+len(extra))
	idx := map[string]int{}
	for _, kv := range append(append([]string{}, base...), extra...) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}
