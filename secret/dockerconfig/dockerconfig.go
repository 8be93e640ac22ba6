// Package dockerconfig reads registry credentials from Docker config.json
// files, .dockerconfigjson and Kubernetes Secret manifests, for
// `pullsecret secret import`. It is apart from package secret so that the
// credential helper, which starts on every pull, links no YAML parser.
package dockerconfig

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/pullsecret/pullsecret/secret"
	"gopkg.in/yaml.v3"
)

// Formats that ParseDockerConfig recognises.
const (
	// FormatDockerConfig is {"auths": {...}}: a Docker config.json or a
	// Kubernetes .dockerconfigjson.
	FormatDockerConfig = "docker-config"
	// FormatDockercfg is the legacy ~/.dockercfg (and Kubernetes .dockercfg)
	// layout: the registry map without the "auths" wrapper.
	FormatDockercfg = "dockercfg"
	// FormatSecretJSON and FormatSecretYAML are Kubernetes Secret manifests
	// whose data (or stringData) holds .dockerconfigjson or .dockercfg.
	FormatSecretJSON = "kubernetes-secret-json"
	FormatSecretYAML = "kubernetes-secret-yaml"
)

// MaxDockerConfigSize bounds the input of ParseDockerConfig.
const MaxDockerConfigSize = 4 << 20

// DockerConfig is what ParseDockerConfig found in a file: one credential
// per registry, and the entries it did not import with the reason.
type DockerConfig struct {
	Format      string
	Credentials []DockerCredential // sorted by Registry
	Skipped     []DockerConfigNote // sorted by Key
}

// DockerCredential is one registry's credential from a Docker config file.
type DockerCredential struct {
	// Key is the entry's key as the file spells it (user info removed).
	Key      string
	Registry secret.Pattern
	Kind     secret.Kind // Basic or Token
	Value    secret.Value
}

// String never prints the value.
func (d DockerCredential) String() string {
	return fmt.Sprintf("dockerconfig.DockerCredential{%s %s REDACTED}", d.Registry, d.Kind)
}

// GoString keeps %#v from leaking the value.
func (d DockerCredential) GoString() string { return d.String() }

// DockerConfigNote says why an entry of the file was not imported. It never
// carries a value.
type DockerConfigNote struct {
	Key    string
	Reason string
}

// ParseDockerConfig reads registry credentials from any of the files that
// hold them: a Docker config.json or a Kubernetes .dockerconfigjson
// ({"auths": {...}}, each entry with "username"/"password", the base64
// "auth" field "user:password", or "identitytoken"), the legacy .dockercfg
// layout, or a Kubernetes Secret manifest in JSON or YAML whose data holds
// one of those.
//
// Registry keys are normalised with ParsePattern. Entries with no
// credential (config.json entries that leave it to a credsStore), wildcard
// keys and registry (bearer) tokens are skipped with a note. Anything
// malformed is an error, and no error or note ever quotes a credential:
// decoding errors are reworded without the input.
func ParseDockerConfig(data []byte) (DockerConfig, error) {
	p := &dcParser{}
	cfg, err := p.parse(data)
	if err != nil {
		return DockerConfig{}, errors.New(p.scrub(err.Error()))
	}
	for i := range cfg.Skipped {
		cfg.Skipped[i].Key = p.scrub(cfg.Skipped[i].Key)
		cfg.Skipped[i].Reason = p.scrub(cfg.Skipped[i].Reason)
	}
	return cfg, nil
}

// dcParser remembers every credential-like string it has seen so that the
// errors and notes it returns can be scrubbed of them, whatever the input
// shape that led a value into a message (a key equal to a password, say).
type dcParser struct {
	secrets []string
}

// minScrub is the shortest value scrubbed from messages; shorter ones would
// shred the message's own words and prove nothing.
const minScrub = 4

func (p *dcParser) addSecret(s string) {
	if len(s) >= minScrub && !slices.Contains(p.secrets, s) {
		p.secrets = append(p.secrets, s)
	}
}

// scrub replaces every remembered value in s. It repeats until none is left,
// since a replacement could join text into a value again; every pass makes
// s shorter, so it ends.
func (p *dcParser) scrub(s string) string {
	for changed := true; changed; {
		changed = false
		for _, v := range p.secrets {
			if strings.Contains(s, v) {
				s = strings.ReplaceAll(s, v, "***")
				changed = true
			}
		}
	}
	return s
}

// secretFields are the entry fields whose values are credentials (matched
// case-insensitively, as encoding/json matches struct fields).
var secretFields = map[string]bool{"password": true, "auth": true, "identitytoken": true, "registrytoken": true}

// collect walks a decoded JSON document and remembers the credential fields
// in it, decoded auth included.
func (p *dcParser) collect(v any) {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			s, ok := x.(string)
			if !ok {
				p.collect(x)
				continue
			}
			lk := strings.ToLower(k)
			if secretFields[lk] {
				p.addSecret(s)
				if lk == "auth" {
					if dec, err := decodeBase64(s); err == nil {
						p.addSecret(string(dec))
						if _, pw, ok := strings.Cut(string(dec), ":"); ok {
							p.addSecret(pw)
						}
					}
				}
			}
			if k == ".dockerconfigjson" || k == ".dockercfg" {
				p.addSecret(s)
			}
		}
	case []any:
		for _, x := range v {
			p.collect(x)
		}
	}
}

func (p *dcParser) parse(data []byte) (DockerConfig, error) {
	if len(data) > MaxDockerConfigSize {
		return DockerConfig{}, fmt.Errorf("larger than %d MiB", MaxDockerConfigSize>>20)
	}
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return DockerConfig{}, errors.New("empty file")
	}
	if trimmed[0] == '{' {
		return p.parseJSON(trimmed, true)
	}
	return p.parseYAML(string(data))
}

// jsonError rewords a decoding error without quoting the input: the
// standard messages can quote the character that broke the syntax.
func jsonError(data []byte, err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		line, col := lineCol(data, se.Offset)
		return fmt.Errorf("not valid JSON (syntax error at line %d, column %d)", line, col)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		// te.Value can hold the literal of a number: never print it.
		return errors.New("not the expected JSON layout")
	}
	return errors.New("not valid JSON")
}

func lineCol(data []byte, off int64) (line, col int) {
	if off < 0 {
		off = 0
	}
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	before := data[:off]
	line = bytes.Count(before, []byte("\n")) + 1
	col = int(off) - bytes.LastIndexByte(before, '\n')
	return line, col
}

// knownConfigKeys are config.json settings that mark a Docker config file
// even when it has no "auths".
var knownConfigKeys = []string{"auths", "credsStore", "credHelpers", "HttpHeaders", "psFormat", "imagesFormat",
	"detachKeys", "currentContext", "plugins", "proxies", "aliases", "features", "experimental", "stackOrchestrator"}

// parseJSON reads a JSON document; manifest says whether a Kubernetes
// manifest is allowed (not inside a manifest's data).
func (p *dcParser) parseJSON(data []byte, manifest bool) (DockerConfig, error) {
	var tree any
	if err := json.Unmarshal(data, &tree); err != nil {
		return DockerConfig{}, jsonError(data, err)
	}
	p.collect(tree)
	top, ok := tree.(map[string]any)
	if !ok {
		return DockerConfig{}, errors.New("not a JSON object")
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return DockerConfig{}, jsonError(data, err)
	}
	_, hasKind := top["kind"]
	_, hasAPI := top["apiVersion"]
	_, hasAuths := top["auths"]
	if manifest && !hasAuths && (hasKind || hasAPI) {
		return p.parseManifestJSON(data)
	}
	if !manifest && (hasKind || hasAPI) && !hasAuths {
		return DockerConfig{}, errors.New("a Kubernetes manifest inside a Secret's data")
	}
	isConfig := false
	for _, k := range knownConfigKeys {
		if _, ok := top[k]; ok {
			isConfig = true
		}
	}
	if !isConfig {
		// The legacy layout: the registry map itself. Every value must be an
		// entry object (or null) for the file to be read as one.
		for k, v := range top {
			if _, ok := v.(map[string]any); !ok && v != nil {
				return DockerConfig{}, fmt.Errorf("not a Docker config file: no \"auths\", and %q is not a registry entry", safeKey(k))
			}
		}
		cfg := DockerConfig{Format: FormatDockercfg}
		if err := p.entries(&cfg, raw, "", nil); err != nil {
			return DockerConfig{}, err
		}
		return cfg, nil
	}

	cfg := DockerConfig{Format: FormatDockerConfig}
	var auths map[string]json.RawMessage
	if a, ok := raw["auths"]; ok {
		if err := json.Unmarshal(a, &auths); err != nil {
			return DockerConfig{}, errors.New(`"auths" is not an object of registry entries`)
		}
	}
	var store string
	if s, ok := raw["credsStore"]; ok {
		if err := json.Unmarshal(s, &store); err != nil {
			return DockerConfig{}, errors.New(`"credsStore" is not a string`)
		}
	}
	var helpers map[string]string
	if h, ok := raw["credHelpers"]; ok {
		if err := json.Unmarshal(h, &helpers); err != nil {
			return DockerConfig{}, errors.New(`"credHelpers" is not an object of registry to helper name`)
		}
	}
	if err := p.entries(&cfg, auths, store, helpers); err != nil {
		return DockerConfig{}, err
	}
	if store != "" && len(auths) == 0 {
		cfg.Skipped = append(cfg.Skipped, DockerConfigNote{Key: "credsStore",
			Reason: fmt.Sprintf("credentials are kept by the credential store %q, not in this file", store)})
	}
	sortNotes(cfg.Skipped)
	return cfg, nil
}

func sortNotes(n []DockerConfigNote) {
	slices.SortStableFunc(n, func(a, b DockerConfigNote) int { return strings.Compare(a.Key, b.Key) })
}

// dockerEntry is one registry entry; encoding/json matches the field names
// case-insensitively, as Docker does.
type dockerEntry struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
	RegistryToken string `json:"registrytoken"`
}

// entries turns a registry map into credentials and notes.
func (p *dcParser) entries(cfg *DockerConfig, auths map[string]json.RawMessage, store string, helpers map[string]string) error {
	keys := make([]string, 0, len(auths))
	for k := range auths {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	byPattern := map[secret.Pattern]int{}
	for _, k := range keys {
		key := safeKey(strings.TrimSpace(k))
		skip := func(reason string) { cfg.Skipped = append(cfg.Skipped, DockerConfigNote{Key: key, Reason: reason}) }
		var e dockerEntry
		if b := auths[k]; !bytes.Equal(bytes.TrimSpace(b), []byte("null")) {
			if err := json.Unmarshal(b, &e); err != nil {
				return fmt.Errorf("registry %q: not a valid entry (auth, username, password and identitytoken must be strings)", key)
			}
		}
		kind, v, err := entryValue(e)
		if err != nil {
			return fmt.Errorf("registry %q: %w", key, err)
		}
		if kind == "" {
			switch {
			case e.RegistryToken != "":
				skip("holds a registry (bearer) token, which pullsecret does not store; log in with an identity token or a password instead")
			case helpers[k] != "":
				skip(fmt.Sprintf("credentials are kept by the credential helper %q, not in this file", helpers[k]))
			case store != "":
				skip(fmt.Sprintf("no credential in this file (the credential store %q keeps it)", store))
			default:
				skip("no credential in this file")
			}
			continue
		}
		if strings.Contains(k, "*") {
			skip("wildcard registry keys are not supported; create a secret per registry instead")
			continue
		}
		pat, err := secret.ParsePattern(k)
		if err != nil {
			return fmt.Errorf("registry %q: %w", key, err)
		}
		if i, ok := byPattern[pat]; ok {
			prev := cfg.Credentials[i]
			if prev.Kind == kind && prev.Value.Username == v.Username && prev.Value.Password == v.Password && prev.Value.IdentityToken == v.IdentityToken {
				continue
			}
			return fmt.Errorf("registries %q and %q both name %s, with different credentials", prev.Key, key, pat)
		}
		byPattern[pat] = len(cfg.Credentials)
		cfg.Credentials = append(cfg.Credentials, DockerCredential{Key: key, Registry: pat, Kind: kind, Value: v})
	}
	// Registries whose credentials live with a helper and have no entry.
	hk := make([]string, 0, len(helpers))
	for k := range helpers {
		if _, ok := auths[k]; !ok {
			hk = append(hk, k)
		}
	}
	slices.Sort(hk)
	for _, k := range hk {
		cfg.Skipped = append(cfg.Skipped, DockerConfigNote{Key: safeKey(k),
			Reason: fmt.Sprintf("credentials are kept by the credential helper %q, not in this file", helpers[k])})
	}
	slices.SortFunc(cfg.Credentials, func(a, b DockerCredential) int { return strings.Compare(string(a.Registry), string(b.Registry)) })
	sortNotes(cfg.Skipped)
	return nil
}

// entryValue reads an entry's credential the way Docker and Kubernetes do:
// an identity token wins; otherwise the "auth" field, when set, overrides
// "username" and "password". A kind of "" means the entry holds none.
func entryValue(e dockerEntry) (secret.Kind, secret.Value, error) {
	if e.IdentityToken != "" {
		return secret.Token, secret.Value{IdentityToken: e.IdentityToken}, nil
	}
	user, pass := e.Username, e.Password
	if a := strings.TrimSpace(e.Auth); a != "" {
		dec, err := decodeBase64(a)
		if err != nil {
			return "", secret.Value{}, errors.New(`the "auth" field is not valid base64`)
		}
		u, pw, ok := strings.Cut(string(dec), ":")
		if !ok {
			return "", secret.Value{}, errors.New(`the "auth" field does not decode to "username:password"`)
		}
		user, pass = u, pw
	}
	switch {
	case user == "" && pass == "":
		return "", secret.Value{}, nil
	case user == "":
		return "", secret.Value{}, errors.New("a password without a username")
	case pass == "":
		return "", secret.Value{}, errors.New("a username without a password")
	case user == "<token>":
		// The docker-credential-helpers spelling of an identity token.
		return secret.Token, secret.Value{IdentityToken: pass}, nil
	}
	return secret.Basic, secret.Value{Username: user, Password: pass}, nil
}

// decodeBase64 accepts standard and URL-safe base64, padded or not, and
// ignores white space (a wrapped manifest value).
func decodeBase64(s string) ([]byte, error) {
	s = strings.Map(func(r rune) rune {
		if r == ' ' || r == '\t' || r == '\n' || r == '\r' {
			return -1
		}
		return r
	}, s)
	var err error
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		var b []byte
		if b, err = enc.DecodeString(s); err == nil {
			return b, nil
		}
	}
	return nil, errors.New("not valid base64")
}

// safeKey makes a registry key fit to print: user info (a password in a
// URL) is cut out, control characters are dropped and it is kept short.
func safeKey(k string) string {
	rest, scheme := k, ""
	if i := strings.Index(rest, "://"); i >= 0 {
		scheme, rest = rest[:i+3], rest[i+3:]
	}
	host, path, hasPath := strings.Cut(rest, "/")
	if i := strings.LastIndex(host, "@"); i >= 0 {
		host = "***@" + host[i+1:]
	}
	k = scheme + host
	if hasPath {
		k += "/" + path
	}
	k = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, k)
	if len(k) > 256 {
		k = k[:256] + "..."
	}
	return k
}

// k8sSecret is the part of a Kubernetes Secret manifest this reads.
type k8sSecret struct {
	Kind       string            `json:"kind"`
	Type       string            `json:"type"`
	Data       map[string]string `json:"data"`
	StringData map[string]string `json:"stringData"`
}

func (p *dcParser) parseManifestJSON(data []byte) (DockerConfig, error) {
	var s k8sSecret
	if err := json.Unmarshal(data, &s); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return DockerConfig{}, errors.New("the Kubernetes manifest's kind and type must be strings, its data and stringData objects of strings")
		}
		return DockerConfig{}, jsonError(data, err)
	}
	if s.Kind != "Secret" {
		return DockerConfig{}, fmt.Errorf("a Kubernetes %q manifest, not a Secret", safeWord(s.Kind))
	}
	var found []dataValue
	for _, k := range []string{".dockerconfigjson", ".dockercfg"} {
		if v, ok := s.Data[k]; ok {
			found = append(found, dataValue{section: "data", key: k, value: v})
		}
		if v, ok := s.StringData[k]; ok {
			found = append(found, dataValue{section: "stringData", key: k, value: v})
		}
	}
	cfg, err := p.manifestData(found)
	cfg.Format = FormatSecretJSON
	return cfg, err
}

// dataValue is one key of a Secret's data or stringData.
type dataValue struct {
	section, key, value string
}

// manifestData reads the docker config held in a Secret: stringData wins
// over data (as the API server merges them), .dockerconfigjson over
// .dockercfg.
func (p *dcParser) manifestData(found []dataValue) (DockerConfig, error) {
	for _, d := range found {
		p.addSecret(d.value)
	}
	rank := func(d dataValue) int {
		r := 0
		if d.key == ".dockercfg" {
			r += 2
		}
		if d.section == "data" {
			r++
		}
		return r
	}
	if len(found) == 0 {
		return DockerConfig{}, errors.New("the Kubernetes Secret has no .dockerconfigjson (or .dockercfg) in its data")
	}
	best := slices.MinFunc(found, func(a, b dataValue) int { return rank(a) - rank(b) })
	where := best.section + "[" + best.key + "]"
	inner := []byte(best.value)
	if best.section == "data" {
		dec, err := decodeBase64(best.value)
		if err != nil {
			return DockerConfig{}, fmt.Errorf("%s is not valid base64", where)
		}
		inner = dec
	}
	inner = bytes.TrimSpace(bytes.TrimPrefix(inner, []byte("\xef\xbb\xbf")))
	if len(inner) == 0 || inner[0] != '{' {
		return DockerConfig{}, fmt.Errorf("%s is not a JSON object", where)
	}
	cfg, err := p.parseJSON(inner, false)
	if err != nil {
		return DockerConfig{}, fmt.Errorf("%s: %w", where, err)
	}
	return cfg, nil
}

// safeWord shortens a word taken from the input for a message.
func safeWord(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, s)
	if len(s) > 64 {
		s = s[:64] + "..."
	}
	return s
}

// parseYAML reads a Kubernetes Secret manifest written in YAML (one or
// more documents; the one Secret holding docker config data is used).
func (p *dcParser) parseYAML(src string) (DockerConfig, error) {
	var docs [][]dataValue
	dec := yaml.NewDecoder(strings.NewReader(src))
	for {
		var m struct {
			Kind       string            `yaml:"kind"`
			Data       map[string]string `yaml:"data"`
			StringData map[string]string `yaml:"stringData"`
		}
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			break
		}
		var te *yaml.TypeError
		if errors.As(err, &te) {
			continue // not a mapping of the Secret's shape
		}
		if err != nil {
			return DockerConfig{}, yamlError(err)
		}
		if m.Kind != "" && m.Kind != "Secret" {
			continue
		}
		var cur []dataValue
		for _, sec := range []struct {
			name string
			m    map[string]string
		}{{"data", m.Data}, {"stringData", m.StringData}} {
			for _, k := range slices.Sorted(maps.Keys(sec.m)) {
				if k != ".dockerconfigjson" && k != ".dockercfg" {
					continue
				}
				cur = append(cur, dataValue{section: sec.name, key: k, value: sec.m[k]})
			}
		}
		if len(cur) > 0 {
			docs = append(docs, cur)
		}
	}
	switch len(docs) {
	case 0:
		return DockerConfig{}, errors.New(notDockerConfig)
	case 1:
	default:
		return DockerConfig{}, fmt.Errorf("the manifest holds %d Secrets with registry credentials; import them one at a time", len(docs))
	}
	cfg, err := p.manifestData(docs[0])
	cfg.Format = FormatSecretYAML
	return cfg, err
}

const notDockerConfig = "not a Docker config file (JSON with \"auths\"), a .dockerconfigjson, " +
	"nor a Kubernetes Secret manifest with .dockerconfigjson data"

// yamlError rewords a YAML error without quoting the input: yaml.v3's
// messages can quote a value, and a value here may be a credential. Only
// the line number is kept.
func yamlError(err error) error {
	msg := err.Error()
	if i := strings.Index(msg, "line "); i >= 0 {
		n := msg[i+5:]
		j := 0
		for j < len(n) && n[j] >= '0' && n[j] <= '9' {
			j++
		}
		if j > 0 {
			return fmt.Errorf("%s (YAML error at line %s)", notDockerConfig, n[:j])
		}
	}
	return errors.New(notDockerConfig + " (neither JSON nor YAML)")
}
