package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/pullsecret/pullsecret/credhelper/kubelet"
	"github.com/pullsecret/pullsecret/secret"
	"gopkg.in/yaml.v3"
)

func configureCommand() *command {
	return &command{
		summary: "Write the client configuration that points Docker, podman, containerd or kubelet at pullsecret",
		sub: map[string]*command{
			"docker":     {summary: "Docker config.json credHelpers", usage: configureDockerUsage, run: (*cli).configureDocker},
			"podman":     {summary: "podman/skopeo auth.json credHelpers and registries.conf mirrors to the proxy", usage: configurePodmanUsage, run: (*cli).configurePodman},
			"containerd": {summary: "containerd hosts.toml per upstream with the proxy as mirror", usage: configureContainerdUsage, run: (*cli).configureContainerd},
			"kubelet":    {summary: "kubelet CredentialProviderConfig for pullsecret-credential-provider", usage: configureKubeletUsage, run: (*cli).configureKubelet},
		},
	}
}

const configureCommonUsage = `  --dry-run             print the change as a unified diff and write nothing

Existing files are merged into: every unrelated entry stays. A changed file
is first copied to FILE.bak-<UTC timestamp>; running the command again
changes nothing and writes nothing. Files are replaced atomically.
`

const configureDockerUsage = `Usage: pullsecret configure docker --registry HOST [--registry HOST ...] [--config FILE] [--dry-run]

Name docker-credential-pullsecret in the credHelpers of Docker's config.json
for each registry, so that docker pull resolves the pull secret at pull time.
auths, credsStore, proxies and every other key are kept.

Flags:
  --registry HOST       registry host[:port] (repeatable); docker.io also
                        writes Docker Hub's https://index.docker.io/v1/ key
  --config FILE         default: $DOCKER_CONFIG/config.json, else
                        ~/.docker/config.json
` + configureCommonUsage

const configurePodmanUsage = `Usage: pullsecret configure podman --registry HOST [...] [--auth-file FILE]
                                 [--proxy HOST:PORT [--registries-conf FILE] [--insecure]] [--dry-run]

Name docker-credential-pullsecret in the credHelpers of the containers
auth.json (podman, skopeo, buildah) for each registry. With --proxy, also
add to registries.conf (v2) a [[registry]] for each registry with the proxy
as its first [[registry.mirror]] (location PROXY/UPSTREAM), and a credHelpers
entry for the proxy host (the helper answers it with the project token in
remote mode: PULLSECRET_SERVER and PULLSECRET_TOKEN).

Flags:
  --registry HOST[=ALIAS]  upstream registry host[:port] (repeatable); ALIAS is
                        the name the proxy knows it by (needed for a host with
                        a port: a path component cannot hold one)
  --auth-file FILE      default: $REGISTRY_AUTH_FILE, else
                        $XDG_CONFIG_HOME/containers/auth.json
  --proxy HOST:PORT     the pullsecret proxy
  --registries-conf FILE  default: $CONTAINERS_REGISTRIES_CONF, else
                        /etc/containers/registries.conf as root, else
                        $XDG_CONFIG_HOME/containers/registries.conf
  --insecure            the proxy speaks plain HTTP (or unverified TLS)
` + configureCommonUsage

const configureContainerdUsage = `Usage: pullsecret configure containerd --hosts-dir DIR --proxy URL --upstream HOST [...] --token-file FILE [--dry-run]

Write DIR/<upstream>/hosts.toml for each upstream registry, with the
pullsecret proxy as its mirror (containerd adds ?ns=<upstream> to each
request) and the proxy's Authorization header built from the project token:
containerd never calls a credential helper. The files hold the token: mode
0600.

Flags:
  --hosts-dir DIR       containerd's config_path (default /etc/containerd/certs.d)
  --proxy URL           the proxy, http(s)://HOST:PORT (no scheme: https)
  --upstream HOST       upstream registry host[:port] (repeatable)
  --token-file FILE     the project pull token
  --skip-verify         do not verify the proxy's TLS certificate
` + configureCommonUsage

const configureKubeletUsage = `Usage: pullsecret configure kubelet --config FILE --match-image PATTERN [...]
                                  (--server URL [--audience A] | --project P) [--dry-run]

Write (or merge into) kubelet's CredentialProviderConfig
(kubelet.config.k8s.io/v1) the provider pullsecret-credential-provider.
With --server, the plugin runs in service-account-token mode: kubelet hands
it each pod's service account token for AUDIENCE, and pullsecret serve
answers with that account's project's credential. Without a server, the
plugin resolves from the node's local store for one project (--project):
use that only on nodes that run a single project.

Flags:
  --config FILE         the provider config file ("-" prints it)
  --match-image PATTERN kubelet matchImages entry (repeatable): host globs
                        per dot-separated part (*.example.com), port exact,
                        path a prefix
  --server URL          pullsecret server (sets PULLSECRET_SERVER)
  --audience A          service account token audience (default pullsecret)
  --cache-type T        ServiceAccount (default) or Token
  --require-service-account=false  also call the plugin for pods without one
  --annotation-key K    a service account annotation to send (repeatable)
  --project P           local mode: the project (sets PULLSECRET_PROJECT)
  --default-cache-duration D  default 5m
  --name NAME           provider name (default pullsecret-credential-provider)
` + configureCommonUsage

// configChange is one file configure would write.
type configChange struct {
	path   string
	old    []byte // nil if the file does not exist
	new    []byte
	mode   fs.FileMode
	exists bool
}

func (ch *configChange) changed() bool { return !ch.exists || !bytes.Equal(ch.old, ch.new) }

// readConfig reads a file that may not exist.
func readConfig(path string) (*configChange, error) {
	ch := &configChange{path: path}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return ch, nil
	case err != nil:
		return nil, err
	}
	if len(b) > 16<<20 {
		return nil, fmt.Errorf("%s is larger than 16 MiB", path)
	}
	ch.old, ch.exists = b, true
	if fi, err := os.Stat(path); err == nil {
		ch.mode = fi.Mode().Perm()
	}
	return ch, nil
}

// apply writes the changes (or, with dryRun, prints their diff). A file
// whose content is unchanged is not touched.
func (c *cli) applyConfig(changes []*configChange, dryRun bool) error {
	now := time.Now().UTC()
	for _, ch := range changes {
		if !ch.changed() {
			fmt.Fprintf(c.stdout, "%s: unchanged\n", ch.path)
			continue
		}
		if dryRun {
			fmt.Fprint(c.stdout, unifiedDiff(ch.path, ch.old, ch.new, ch.exists))
			continue
		}
		if err := os.MkdirAll(filepath.Dir(ch.path), 0o755); err != nil {
			return err
		}
		if ch.exists {
			bak := ch.path + ".bak-" + now.Format("20060102T150405Z")
			for i := 1; fileExists(bak); i++ {
				bak = ch.path + ".bak-" + now.Format("20060102T150405Z") + "." + strconv.Itoa(i)
			}
			if err := writeConfigAtomic(bak, ch.old, ch.mode); err != nil {
				return fmt.Errorf("back up %s: %w", ch.path, err)
			}
			if err := writeConfigAtomic(ch.path, ch.new, ch.mode); err != nil {
				return err
			}
			fmt.Fprintf(c.stdout, "%s: updated (previous version in %s)\n", ch.path, bak)
			continue
		}
		if err := writeConfigAtomic(ch.path, ch.new, ch.mode); err != nil {
			return err
		}
		fmt.Fprintf(c.stdout, "%s: created\n", ch.path)
	}
	return nil
}

func fileExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// writeConfigAtomic writes data to path through a temporary file in the
// same folder, fsync and rename.
func writeConfigAtomic(path string, data []byte, mode fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	// A symlinked config (dotfiles managers do this) is written through.
	if real, err := filepath.EvalSymlinks(path); err == nil {
		path, dir = real, filepath.Dir(real)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err = f.Chmod(mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// configureFlags are the flags every configure command has.
func (c *cli) configureFlags(name string) (*flag.FlagSet, *bool) {
	fs := newFlagSet(name)
	return fs, fs.Bool("dry-run", false, "")
}

// registryHost canonicalises a registry host[:port] flag.
func registryHost(s string) (string, error) {
	t, err := secret.ParseServerURL(s)
	if err != nil {
		return "", err
	}
	if t.Repo != "" {
		return "", fmt.Errorf("%q: a registry host[:port], without a path", s)
	}
	return t.Host, nil
}

// ---- docker and podman: JSON credHelpers ----

// dockerHubKey is the key Docker CLI looks Docker Hub up under.
const dockerHubKey = "https://index.docker.io/v1/"

// mergeCredHelpers sets credHelpers[key] = helper for every key in a
// Docker or containers JSON config, keeping every other key. It returns
// the old bytes unchanged when nothing is missing.
func mergeCredHelpers(old []byte, keys []string, helper string) ([]byte, error) {
	doc := map[string]json.RawMessage{}
	if len(bytes.TrimSpace(old)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(old))
		dec.UseNumber()
		if err := dec.Decode(&doc); err != nil {
			return nil, fmt.Errorf("not a JSON object: %v (fix or move the file)", err)
		}
	}
	helpers := map[string]string{}
	if raw, ok := doc["credHelpers"]; ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &helpers); err != nil {
			return nil, fmt.Errorf("credHelpers is not a map of registry to helper: %v", err)
		}
	}
	changed := false
	for _, k := range keys {
		if helpers[k] != helper {
			helpers[k] = helper
			changed = true
		}
	}
	if !changed && old != nil {
		return old, nil
	}
	raw, err := json.Marshal(helpers)
	if err != nil {
		return nil, err
	}
	doc["credHelpers"] = raw
	if _, ok := doc["auths"]; !ok {
		doc["auths"] = json.RawMessage("{}")
	}
	out, err := json.MarshalIndent(doc, "", "\t")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

func (c *cli) configureDocker(args []string) error {
	fs, dryRun := c.configureFlags("docker")
	var regs stringList
	fs.Var(&regs, "registry", "")
	file := fs.String("config", "", "")
	pos, err := c.parseFlags(fs, args, configureDockerUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, configureDockerUsage); err != nil {
		return err
	}
	if len(regs) == 0 {
		return &usageError{msg: "at least one --registry is required", usage: configureDockerUsage}
	}
	var keys []string
	for _, r := range regs {
		h, err := registryHost(r)
		if err != nil {
			return &usageError{msg: "--registry " + err.Error(), usage: configureDockerUsage}
		}
		keys = append(keys, h)
		if h == secret.DockerHub {
			keys = append(keys, dockerHubKey)
		}
	}
	path := *file
	if path == "" {
		dir := c.getenv("DOCKER_CONFIG")
		if dir == "" {
			home := c.getenv("HOME")
			if home == "" {
				return errors.New("no HOME: give --config FILE")
			}
			dir = filepath.Join(home, ".docker")
		}
		path = filepath.Join(dir, "config.json")
	}
	ch, err := readConfig(path)
	if err != nil {
		return err
	}
	if ch.new, err = mergeCredHelpers(ch.old, keys, "pullsecret"); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	ch.mode = 0o600 // it may hold auths
	return c.applyConfig([]*configChange{ch}, *dryRun)
}

// ---- podman: auth.json and registries.conf ----

// upstreamFlag is an upstream registry and the name the proxy knows it by.
type upstreamFlag struct {
	host  string
	alias string // "" when the host itself names it
}

func (u upstreamFlag) proxyName() string {
	if u.alias != "" {
		return u.alias
	}
	return u.host
}

func parseUpstream(s string) (upstreamFlag, error) {
	h, alias, _ := strings.Cut(s, "=")
	host, err := registryHost(h)
	if err != nil {
		return upstreamFlag{}, err
	}
	if alias != "" && !regexp.MustCompile(`^[a-z0-9]+(?:[_-][a-z0-9]+)*$`).MatchString(alias) {
		return upstreamFlag{}, fmt.Errorf("alias %q: lowercase letters, digits, '-' and '_'", alias)
	}
	return upstreamFlag{host: host, alias: alias}, nil
}

func (c *cli) configurePodman(args []string) error {
	fs, dryRun := c.configureFlags("podman")
	var regs stringList
	fs.Var(&regs, "registry", "")
	authFile := fs.String("auth-file", "", "")
	proxyFlag := fs.String("proxy", "", "")
	regConf := fs.String("registries-conf", "", "")
	insecure := fs.Bool("insecure", false, "")
	pos, err := c.parseFlags(fs, args, configurePodmanUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, configurePodmanUsage); err != nil {
		return err
	}
	if len(regs) == 0 {
		return &usageError{msg: "at least one --registry is required", usage: configurePodmanUsage}
	}
	var ups []upstreamFlag
	var keys []string
	for _, r := range regs {
		u, err := parseUpstream(r)
		if err != nil {
			return &usageError{msg: "--registry " + err.Error(), usage: configurePodmanUsage}
		}
		ups = append(ups, u)
		keys = append(keys, u.host)
	}
	proxyHost := ""
	if *proxyFlag != "" {
		if proxyHost, err = registryHost(*proxyFlag); err != nil {
			return &usageError{msg: "--proxy " + err.Error(), usage: configurePodmanUsage}
		}
		keys = append(keys, proxyHost)
		for _, u := range ups {
			if strings.Contains(u.proxyName(), ":") {
				return &usageError{msg: fmt.Sprintf("--registry %s: a host with a port cannot be a path component on the proxy; give the alias the server knows it by: --registry %s=ALIAS", u.host, u.host), usage: configurePodmanUsage}
			}
		}
	} else if *regConf != "" || *insecure {
		return &usageError{msg: "--registries-conf and --insecure go with --proxy", usage: configurePodmanUsage}
	}
	xdg := c.getenv("XDG_CONFIG_HOME")
	if xdg == "" && c.getenv("HOME") != "" {
		xdg = filepath.Join(c.getenv("HOME"), ".config")
	}
	path := *authFile
	if path == "" {
		path = c.getenv("REGISTRY_AUTH_FILE")
	}
	if path == "" {
		if xdg == "" {
			return errors.New("no HOME: give --auth-file FILE")
		}
		path = filepath.Join(xdg, "containers", "auth.json")
	}
	ch, err := readConfig(path)
	if err != nil {
		return err
	}
	if ch.new, err = mergeCredHelpers(ch.old, keys, "pullsecret"); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	ch.mode = 0o600
	changes := []*configChange{ch}
	if proxyHost != "" {
		rc := *regConf
		if rc == "" {
			rc = c.getenv("CONTAINERS_REGISTRIES_CONF")
		}
		if rc == "" {
			if os.Geteuid() == 0 {
				rc = "/etc/containers/registries.conf"
			} else if xdg != "" {
				rc = filepath.Join(xdg, "containers", "registries.conf")
			} else {
				return errors.New("no HOME: give --registries-conf FILE")
			}
		}
		rch, err := readConfig(rc)
		if err != nil {
			return err
		}
		rch.new = rch.old
		for _, u := range ups {
			if rch.new, err = mergeRegistryMirror(rch.new, u.host, proxyHost+"/"+u.proxyName(), *insecure); err != nil {
				return fmt.Errorf("%s: %w", rc, err)
			}
		}
		if rch.mode == 0 {
			rch.mode = 0o644
		}
		changes = append(changes, rch)
	}
	return c.applyConfig(changes, *dryRun)
}

// registriesConf is what configure reads of a registries.conf.
type registriesConf struct {
	Registries *toml.Primitive `toml:"registries"` // v1: cannot be mixed with v2
	Registry   []struct {
		Location string `toml:"location"`
		Prefix   string `toml:"prefix"`
		Mirror   []struct {
			Location string `toml:"location"`
			Insecure bool   `toml:"insecure"`
		} `toml:"mirror"`
	} `toml:"registry"`
}

var (
	tomlTableHeader   = regexp.MustCompile(`^\s*\[`)
	tomlRegistryArray = regexp.MustCompile(`^\s*\[\[\s*registry\s*\]\]\s*(#.*)?$`)
	tomlMirrorArray   = regexp.MustCompile(`^\s*\[\[\s*registry\s*\.\s*mirror\s*\]\]\s*(#.*)?$`)
	tomlRegistrySub   = regexp.MustCompile(`^\s*\[\[?\s*registry\s*\.`)
)

// mergeRegistryMirror makes mirror the first [[registry.mirror]] of the
// [[registry]] whose location (or prefix) is upstream, adding the
// registry if there is none. The file is edited as text, so comments and
// every unrelated entry survive; the result is checked by decoding it.
func mergeRegistryMirror(old []byte, upstream, mirror string, insecure bool) ([]byte, error) {
	var conf registriesConf
	if _, err := toml.Decode(string(old), &conf); err != nil {
		return nil, fmt.Errorf("not valid TOML: %v", err)
	}
	if conf.Registries != nil {
		return nil, errors.New("a v1 registries.conf ([registries.search] ...) cannot take v2 [[registry]] mirrors: convert it to v2 first")
	}
	idx := -1
	for i, r := range conf.Registry {
		if r.Prefix == upstream || (r.Prefix == "" && r.Location == upstream) {
			idx = i
		}
	}
	mirrorTOML := fmt.Sprintf("[[registry.mirror]]\nlocation = %s\n", strconv.Quote(mirror))
	if insecure {
		mirrorTOML += "insecure = true\n"
	}
	var out string
	if idx < 0 {
		out = string(old)
		if out != "" && !strings.HasSuffix(out, "\n") {
			out += "\n"
		}
		if out != "" {
			out += "\n"
		}
		out += fmt.Sprintf("# Pulls of %s go through the pullsecret proxy first.\n[[registry]]\nlocation = %s\n\n%s", upstream, strconv.Quote(upstream), mirrorTOML)
	} else {
		for _, m := range conf.Registry[idx].Mirror {
			if m.Location == mirror && m.Insecure == insecure {
				return old, nil
			}
			if m.Location == mirror {
				return nil, fmt.Errorf("registry %s already has mirror %s with insecure = %t: edit it by hand", upstream, mirror, m.Insecure)
			}
		}
		lines := strings.SplitAfter(string(old), "\n")
		// The idx-th [[registry]] header, and where its block's mirrors start
		// or its block ends.
		n, start := -1, -1
		for i, l := range lines {
			if tomlRegistryArray.MatchString(l) {
				n++
				if n == idx {
					start = i
					break
				}
			}
		}
		if start < 0 {
			return nil, errors.New("[[registry]] entries written inline (registry = [...]) cannot be merged into: add the mirror by hand")
		}
		at := len(lines)
		for i := start + 1; i < len(lines); i++ {
			if tomlMirrorArray.MatchString(lines[i]) {
				at = i // before the first mirror: ours is tried first
				break
			}
			if tomlTableHeader.MatchString(lines[i]) && !tomlRegistrySub.MatchString(lines[i]) {
				at = i
				break
			}
		}
		block := mirrorTOML + "\n"
		if at == len(lines) && len(lines) > 0 && !strings.HasSuffix(lines[len(lines)-1], "\n") {
			block = "\n" + block
		}
		out = strings.Join(lines[:at], "") + block + strings.Join(lines[at:], "")
	}
	// Check the result says what was meant.
	var check registriesConf
	if _, err := toml.Decode(out, &check); err != nil {
		return nil, fmt.Errorf("could not merge the mirror into it (%v): add it by hand", err)
	}
	ok := false
	for _, r := range check.Registry {
		if (r.Prefix == upstream || (r.Prefix == "" && r.Location == upstream)) && len(r.Mirror) > 0 && r.Mirror[0].Location == mirror {
			ok = true
		}
	}
	if !ok || len(check.Registry) < len(conf.Registry) {
		return nil, errors.New("could not merge the mirror into it: add it by hand")
	}
	return []byte(out), nil
}

// ---- containerd: hosts.toml ----

func (c *cli) configureContainerd(args []string) error {
	fs, dryRun := c.configureFlags("containerd")
	var ups stringList
	fs.Var(&ups, "upstream", "")
	hostsDir := fs.String("hosts-dir", "/etc/containerd/certs.d", "")
	proxyFlag := fs.String("proxy", "", "")
	tokenFile := fs.String("token-file", "", "")
	skipVerify := fs.Bool("skip-verify", false, "")
	pos, err := c.parseFlags(fs, args, configureContainerdUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, configureContainerdUsage); err != nil {
		return err
	}
	if len(ups) == 0 {
		return &usageError{msg: "at least one --upstream is required", usage: configureContainerdUsage}
	}
	if *proxyFlag == "" {
		return &usageError{msg: "--proxy is required", usage: configureContainerdUsage}
	}
	if *tokenFile == "" {
		return &usageError{msg: "--token-file is required: containerd calls no credential helper, so the proxy's Authorization header holds the project token", usage: configureContainerdUsage}
	}
	proxyURL, err := parseProxyURL(*proxyFlag)
	if err != nil {
		return &usageError{msg: "--proxy " + err.Error(), usage: configureContainerdUsage}
	}
	tok, err := c.readValue("token", false, *tokenFile)
	if err != nil {
		return err
	}
	header := "Basic " + base64.StdEncoding.EncodeToString([]byte("pullsecret:"+tok))
	var changes []*configChange
	for _, u := range ups {
		host, err := registryHost(u)
		if err != nil {
			return &usageError{msg: "--upstream " + err.Error(), usage: configureContainerdUsage}
		}
		path := filepath.Join(*hostsDir, host, "hosts.toml")
		ch, err := readConfig(path)
		if err != nil {
			return err
		}
		server := "https://" + host
		if host == secret.DockerHub {
			server = "https://registry-1.docker.io"
		}
		if ch.new, err = mergeHostsTOML(ch.old, server, proxyURL, header, *skipVerify); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		ch.mode = 0o600 // it holds the token
		changes = append(changes, ch)
	}
	return c.applyConfig(changes, *dryRun)
}

// parseProxyURL takes http(s)://HOST[:PORT] or HOST[:PORT] (https).
func parseProxyURL(s string) (string, error) {
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return "", fmt.Errorf("%q: want http(s)://HOST[:PORT]", s)
	}
	return u.Scheme + "://" + u.Host, nil
}

// hostsFile is what configure reads of a hosts.toml.
type hostsFile struct {
	Server string `toml:"server"`
	Host   map[string]struct {
		Capabilities []string       `toml:"capabilities"`
		Header       map[string]any `toml:"header"`
	} `toml:"host"`
}

// mergeHostsTOML puts the proxy's [host."PROXY"] table, with its header,
// first among the hosts of a hosts.toml, replacing an earlier version of
// it and keeping every other host and the server line. The file is edited
// as text and checked by decoding the result.
func mergeHostsTOML(old []byte, server, proxy, header string, skipVerify bool) ([]byte, error) {
	var hf hostsFile
	if _, err := toml.Decode(string(old), &hf); err != nil {
		return nil, fmt.Errorf("not valid TOML: %v", err)
	}
	q := strconv.Quote(proxy)
	var b strings.Builder
	fmt.Fprintf(&b, "# The pullsecret proxy, tried first (it receives ?ns=<upstream>).\n[host.%s]\n  capabilities = [\"pull\", \"resolve\"]\n", q)
	if skipVerify {
		b.WriteString("  skip_verify = true\n")
	}
	fmt.Fprintf(&b, "  [host.%s.header]\n    Authorization = [%s]\n", q, strconv.Quote(header))
	block := b.String()

	lines := strings.SplitAfter(string(old), "\n")
	if len(lines) > 0 && lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	// Our block: from its header (and the comment line this command writes
	// above it) to the next table that is not one of its subtables.
	ours := regexp.MustCompile(`^\s*\[\s*host\s*\.\s*` + regexp.QuoteMeta(q) + `\s*[\].]`)
	start, end := -1, -1
	for i, l := range lines {
		if start < 0 && ours.MatchString(l) {
			start = i
			if i > 0 && strings.HasPrefix(lines[i-1], "# The pullsecret proxy") {
				start = i - 1
			}
			continue
		}
		if start >= 0 && end < 0 && tomlTableHeader.MatchString(l) && !ours.MatchString(l) {
			end = i
		}
	}
	var out string
	switch {
	case start >= 0:
		if end < 0 {
			end = len(lines)
		}
		rest := strings.Join(lines[end:], "")
		sep := ""
		if rest != "" {
			sep = "\n"
		}
		out = strings.Join(lines[:start], "") + block + sep + rest
	default:
		first := -1
		for i, l := range lines {
			if tomlTableHeader.MatchString(l) {
				first = i
				break
			}
		}
		head := strings.Join(lines, "")
		tail := ""
		if first >= 0 {
			head, tail = strings.Join(lines[:first], ""), strings.Join(lines[first:], "")
		}
		if hf.Server == "" {
			head = "server = " + strconv.Quote(server) + "\n" + head
		}
		if head != "" && !strings.HasSuffix(head, "\n\n") {
			if !strings.HasSuffix(head, "\n") {
				head += "\n"
			}
			head += "\n"
		}
		if tail != "" {
			block += "\n"
		}
		out = head + block + tail
	}
	var check hostsFile
	md, err := toml.Decode(out, &check)
	if err != nil {
		return nil, fmt.Errorf("could not merge the proxy into it (%v): edit it by hand", err)
	}
	h, ok := check.Host[proxy]
	if !ok || len(check.Host) < len(hf.Host) || (hf.Server != "" && check.Server != hf.Server) {
		return nil, errors.New("could not merge the proxy into it: edit it by hand")
	}
	if v, _ := h.Header["Authorization"].([]any); len(v) != 1 || v[0] != header {
		return nil, errors.New("could not merge the proxy's header into it: edit it by hand")
	}
	// The proxy must be the first host containerd tries.
	for _, k := range md.Keys() {
		if len(k) == 2 && k[0] == "host" {
			if k[1] != proxy {
				return nil, fmt.Errorf("host %s comes before the proxy: move it below by hand", k[1])
			}
			break
		}
	}
	if bytes.Equal([]byte(out), old) {
		return old, nil
	}
	return []byte(out), nil
}

// ---- kubelet: CredentialProviderConfig ----

const (
	kubeletConfigAPIVersion = "kubelet.config.k8s.io/v1"
	kubeletConfigKind       = "CredentialProviderConfig"
	defaultProviderName     = "pullsecret-credential-provider"
)

// kubeletProvider is our provider entry, in kubelet's field order.
type kubeletProvider struct {
	Name                 string             `yaml:"name"`
	MatchImages          []string           `yaml:"matchImages"`
	DefaultCacheDuration string             `yaml:"defaultCacheDuration"`
	APIVersion           string             `yaml:"apiVersion"`
	Env                  []kubeletEnv       `yaml:"env,omitempty"`
	TokenAttributes      *kubeletTokenAttrs `yaml:"tokenAttributes,omitempty"`
}

type kubeletEnv struct {
	Name  string `yaml:"name"`
	Value string `yaml:"value"`
}

type kubeletTokenAttrs struct {
	ServiceAccountTokenAudience          string   `yaml:"serviceAccountTokenAudience"`
	CacheType                            string   `yaml:"cacheType"`
	RequireServiceAccount                bool     `yaml:"requireServiceAccount"`
	RequiredServiceAccountAnnotationKeys []string `yaml:"requiredServiceAccountAnnotationKeys,omitempty"`
}

func (c *cli) configureKubelet(args []string) error {
	fs, dryRun := c.configureFlags("kubelet")
	var match, annotations stringList
	fs.Var(&match, "match-image", "")
	fs.Var(&annotations, "annotation-key", "")
	file := fs.String("config", "", "")
	server := fs.String("server", "", "")
	audience := fs.String("audience", "pullsecret", "")
	cacheType := fs.String("cache-type", "ServiceAccount", "")
	requireSA := fs.Bool("require-service-account", true, "")
	project := fs.String("project", "", "")
	cacheDur := fs.Duration("default-cache-duration", kubelet.DefaultProviderCacheDuration, "")
	name := fs.String("name", defaultProviderName, "")
	pos, err := c.parseFlags(fs, args, configureKubeletUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, configureKubeletUsage); err != nil {
		return err
	}
	usage := func(msg string) error { return &usageError{msg: msg, usage: configureKubeletUsage} }
	if *file == "" {
		return usage("--config FILE is required (\"-\" prints the config)")
	}
	if len(match) == 0 {
		return usage("at least one --match-image is required")
	}
	for _, m := range match {
		if err := kubelet.ValidMatchImage(m); err != nil {
			return usage("--" + err.Error())
		}
	}
	if *cacheDur < 0 {
		return usage("--default-cache-duration must not be negative")
	}
	if err := secret.ValidName(*name); err != nil || strings.Contains(*name, "/") {
		return usage(fmt.Sprintf("--name %q: a plain program name", printable(*name)))
	}
	p := kubeletProvider{
		Name:                 *name,
		MatchImages:          match,
		DefaultCacheDuration: cacheDur.String(),
		APIVersion:           kubelet.ProviderAPIVersion,
	}
	switch {
	case *server != "" && *project != "":
		return usage("--server and --project cannot be used together: the server maps service accounts to projects")
	case *server != "":
		u, err := url.Parse(*server)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
			return usage("--server: want http(s)://HOST[:PORT]")
		}
		if *audience == "" {
			return usage("--audience must not be empty")
		}
		if *cacheType != "ServiceAccount" && *cacheType != "Token" {
			return usage("--cache-type: want ServiceAccount or Token")
		}
		if len(annotations) > 0 && !*requireSA {
			return usage("--annotation-key needs --require-service-account")
		}
		p.Env = []kubeletEnv{{Name: "PULLSECRET_SERVER", Value: strings.TrimRight(u.String(), "/")}}
		p.TokenAttributes = &kubeletTokenAttrs{
			ServiceAccountTokenAudience:          *audience,
			CacheType:                            *cacheType,
			RequireServiceAccount:                *requireSA,
			RequiredServiceAccountAnnotationKeys: annotations,
		}
	case *project != "":
		if err := secret.ValidName(*project); err != nil {
			return usage("--project: " + err.Error())
		}
		p.Env = []kubeletEnv{{Name: "PULLSECRET_PROJECT", Value: *project}}
	default:
		return usage("give --server URL (service-account-token mode) or --project P (local mode)")
	}
	if *file == "-" {
		out, err := mergeKubeletConfig(nil, p)
		if err != nil {
			return err
		}
		_, err = c.stdout.Write(out)
		return err
	}
	ch, err := readConfig(*file)
	if err != nil {
		return err
	}
	if ch.new, err = mergeKubeletConfig(ch.old, p); err != nil {
		return fmt.Errorf("%s: %w", *file, err)
	}
	if ch.mode == 0 {
		ch.mode = 0o644 // no secret in it: a server URL and patterns
	}
	return c.applyConfig([]*configChange{ch}, *dryRun)
}

// mergeKubeletConfig sets our provider in a CredentialProviderConfig,
// keeping every other provider and any field of ours this command does not
// set (args, for one). Nothing changes when ours is already as wanted.
func mergeKubeletConfig(old []byte, p kubeletProvider) ([]byte, error) {
	var want yaml.Node
	if err := want.Encode(p); err != nil {
		return nil, err
	}
	var doc yaml.Node
	if len(bytes.TrimSpace(old)) > 0 {
		if err := yaml.Unmarshal(old, &doc); err != nil {
			return nil, fmt.Errorf("not valid YAML: %v", err)
		}
	}
	var root *yaml.Node
	if doc.Kind == yaml.DocumentNode && len(doc.Content) == 1 {
		root = doc.Content[0]
	} else {
		root = &yaml.Node{Kind: yaml.MappingNode}
		doc = yaml.Node{Kind: yaml.DocumentNode, Content: []*yaml.Node{root}}
	}
	if root.Kind != yaml.MappingNode {
		return nil, errors.New("not a CredentialProviderConfig (want a mapping)")
	}
	changed := false
	for _, kv := range [][2]string{{"apiVersion", kubeletConfigAPIVersion}, {"kind", kubeletConfigKind}} {
		v := yamlGet(root, kv[0])
		switch {
		case v == nil:
			yamlSet(root, kv[0], &yaml.Node{Kind: yaml.ScalarNode, Value: kv[1]})
			changed = true
		case v.Value != kv[1]:
			return nil, fmt.Errorf("%s is %q, not %s: not a file this command writes", kv[0], v.Value, kv[1])
		}
	}
	providers := yamlGet(root, "providers")
	if providers == nil || (providers.Kind == yaml.ScalarNode && providers.Tag == "!!null") {
		providers = &yaml.Node{Kind: yaml.SequenceNode}
		yamlSet(root, "providers", providers)
	}
	if providers.Kind != yaml.SequenceNode {
		return nil, errors.New("providers is not a list")
	}
	var ours *yaml.Node
	for _, e := range providers.Content {
		if n := yamlGet(e, "name"); n != nil && n.Value == p.Name {
			ours = e
		}
	}
	if ours == nil {
		providers.Content = append(providers.Content, &want)
		changed = true
	} else {
		for i := 0; i+1 < len(want.Content); i += 2 {
			k, v := want.Content[i].Value, want.Content[i+1]
			if cur := yamlGet(ours, k); cur == nil || !yamlEqual(cur, v) {
				yamlSet(ours, k, v)
				changed = true
			}
		}
		// Fields we no longer set (tokenAttributes in local mode) go.
		for _, k := range []string{"tokenAttributes", "env"} {
			if yamlGet(&want, k) == nil && yamlGet(ours, k) != nil {
				yamlDelete(ours, k)
				changed = true
			}
		}
	}
	if !changed && old != nil {
		return old, nil
	}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&doc); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func yamlGet(m *yaml.Node, key string) *yaml.Node {
	if m == nil || m.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}

func yamlSet(m *yaml.Node, key string, v *yaml.Node) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			m.Content[i+1] = v
			return
		}
	}
	m.Content = append(m.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: key}, v)
}

func yamlDelete(m *yaml.Node, key string) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			m.Content = slices.Delete(m.Content, i, i+2)
			return
		}
	}
}

// yamlEqual compares two nodes by what they decode to.
func yamlEqual(a, b *yaml.Node) bool {
	var x, y any
	if a.Decode(&x) != nil || b.Decode(&y) != nil {
		return false
	}
	jx, err1 := json.Marshal(x)
	jy, err2 := json.Marshal(y)
	return err1 == nil && err2 == nil && bytes.Equal(jx, jy)
}

// ---- unified diff ----

// unifiedDiff is a unified diff (3 lines of context) from old to new.
func unifiedDiff(path string, old, new []byte, existed bool) string {
	a, b := splitLines(old), splitLines(new)
	var out strings.Builder
	from := path
	if !existed {
		from = "/dev/null"
	}
	fmt.Fprintf(&out, "--- %s\n+++ %s\n", from, path)
	ops := diffLines(a, b)
	const ctx = 3
	// Group the operations into hunks.
	type op struct {
		kind byte // ' ', '-', '+'
		line string
		ai   int
		bi   int
	}
	var all []op
	ai, bi := 0, 0
	for _, o := range ops {
		switch o {
		case ' ':
			all = append(all, op{' ', a[ai], ai, bi})
			ai++
			bi++
		case '-':
			all = append(all, op{'-', a[ai], ai, bi})
			ai++
		case '+':
			all = append(all, op{'+', b[bi], ai, bi})
			bi++
		}
	}
	for i := 0; i < len(all); {
		if all[i].kind == ' ' {
			i++
			continue
		}
		start := max(0, i-ctx)
		end := i
		for j := i; j < len(all); j++ {
			if all[j].kind != ' ' {
				end = j
			} else if j-end > 2*ctx {
				break
			}
		}
		stop := min(len(all), end+ctx+1)
		h := all[start:stop]
		na, nb := 0, 0
		for _, o := range h {
			if o.kind != '+' {
				na++
			}
			if o.kind != '-' {
				nb++
			}
		}
		sa, sb := h[0].ai+1, h[0].bi+1
		if na == 0 {
			sa--
		}
		if nb == 0 {
			sb--
		}
		fmt.Fprintf(&out, "@@ -%d,%d +%d,%d @@\n", sa, na, sb, nb)
		for _, o := range h {
			out.WriteByte(o.kind)
			out.WriteString(o.line)
			if !strings.HasSuffix(o.line, "\n") {
				out.WriteString("\n\\ No newline at end of file\n")
			}
		}
		i = stop
	}
	return out.String()
}

func splitLines(b []byte) []string {
	lines := strings.SplitAfter(string(b), "\n")
	if lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	return lines
}

// diffLines is an LCS edit script: ' ' keep, '-' delete from a, '+' insert
// from b.
func diffLines(a, b []string) []byte {
	if len(a)*len(b) > 4_000_000 {
		ops := make([]byte, 0, len(a)+len(b))
		for range a {
			ops = append(ops, '-')
		}
		for range b {
			ops = append(ops, '+')
		}
		return ops
	}
	n, m := len(a), len(b)
	lcs := make([][]int32, n+1)
	for i := range lcs {
		lcs[i] = make([]int32, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if a[i] == b[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var ops []byte
	i, j := 0, 0
	for i < n && j < m {
		switch {
		case a[i] == b[j]:
			ops = append(ops, ' ')
			i++
			j++
		case lcs[i+1][j] >= lcs[i][j+1]:
			ops = append(ops, '-')
			i++
		default:
			ops = append(ops, '+')
			j++
		}
	}
	for ; i < n; i++ {
		ops = append(ops, '-')
	}
	for ; j < m; j++ {
		ops = append(ops, '+')
	}
	return ops
}
