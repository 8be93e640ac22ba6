// Package spec reads service specs and splits each into a pull plan (the
// image, its registry and the image pull secret read while pulling, and
// only then) and a runtime plan (the image pinned by digest, the
// environment and the runtime secrets the running container gets). An
// image pull secret never appears in a runtime plan.
//
// A spec is YAML:
//
//	version: v1
//	kind: Service
//	metadata: {name: github-agent}
//	container:
//	  image: ghcr.io/acme/agent:1.4
//	  pull_secret: ghcr-acme            # image pull secret: read while pulling only
//	  secrets: [openai-keys]            # project keys secrets: delivered to the running container
//	  environment:
//	    - {name: LOG_LEVEL, value: info}
//	    - {name: GITHUB_TOKEN, secret: {name: gh-room, key: token}}
//
// Decoding is strict: an unknown field, a field given twice or a value of
// the wrong shape is an error that names the file, line and field.
package spec

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Version and Kind are the only ones this package reads.
const (
	Version = "v1"
	Kind    = "Service"
)

// MaxSize bounds a spec file.
const MaxSize = 1 << 20

// Spec is a parsed service spec. It holds names of secrets, never their
// values.
type Spec struct {
	File      string
	Version   string
	Kind      string
	Metadata  Metadata
	Container Container

	at map[string]pos // field path -> where its value is
}

// Metadata names the service.
type Metadata struct {
	Name        string
	Labels      map[string]string
	Annotations map[string]string
}

// Container is what runs.
type Container struct {
	Image string
	// PullSecret names the project's image pull secret for Image; "" pulls
	// anonymously.
	PullSecret string
	// Secrets name project keys secrets delivered to the running container.
	Secrets     []string
	Environment []EnvVar
}

// EnvVar is one environment variable: a literal value or a secret
// reference.
type EnvVar struct {
	Name   string
	Value  string
	Secret *SecretKeyRef // nil for a literal value
}

// SecretKeyRef names one key of a runtime secret.
type SecretKeyRef struct {
	Name string `json:"name"`
	Key  string `json:"key"`
}

// Pos returns the line and column of the value at a field path such as
// "container.image" or "container.environment[1].secret.name" (0, 0 if the
// field is absent).
func (s *Spec) Pos(field string) (line, col int) {
	p := s.at[field]
	return p.line, p.col
}

func (s *Spec) pos(field string) pos {
	if p, ok := s.at[field]; ok {
		return p
	}
	// Fall back to the closest enclosing field that is there.
	for {
		i := strings.LastIndexAny(field, ".[")
		if i < 0 {
			return pos{line: 1, col: 1}
		}
		field = field[:i]
		if p, ok := s.at[field]; ok {
			return p
		}
	}
}

// ReadFile reads and parses a spec file.
func ReadFile(path string) (*Spec, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(data) > MaxSize {
		return nil, &Error{Diagnostics: []Diagnostic{{File: path, Message: fmt.Sprintf("spec file is larger than %d bytes", MaxSize)}}}
	}
	return Parse(path, data)
}

// Parse parses a spec. file names it in diagnostics. The error, if any, is
// an *Error listing every problem found.
func Parse(file string, data []byte) (*Spec, error) {
	d := &diags{file: file}
	s := &Spec{File: file, at: map[string]pos{}}
	root, err := decodeOne(data)
	if err != nil {
		d.list = append(d.list, yamlDiagnostic(file, data, err))
		return nil, d.err()
	}
	if root == nil {
		d.add(pos{line: 1}, "", "the file holds no spec (expected version, kind, metadata and container)")
		return nil, d.err()
	}
	p := &parser{d: d, s: s}
	p.root(root)
	if err := d.err(); err != nil {
		return nil, err
	}
	return s, nil
}

// decodeOne decodes exactly one YAML document.
func decodeOne(data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, err
	}
	var next yaml.Node
	if err := dec.Decode(&next); err == nil {
		line := next.Line
		if next.Kind == yaml.DocumentNode && len(next.Content) > 0 {
			line = next.Content[0].Line
		}
		return nil, fmt.Errorf("yaml: line %d: a second YAML document; a spec file holds one service", line)
	} else if !errors.Is(err, io.EOF) {
		return nil, err
	}
	if doc.Kind == yaml.DocumentNode {
		if len(doc.Content) == 0 {
			return nil, nil
		}
		n := doc.Content[0]
		if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
			return nil, nil
		}
		return n, nil
	}
	return &doc, nil
}

var (
	yamlLine    = regexp.MustCompile(`^yaml: (?:line (\d+): )?(.*)$`)
	unknownAnch = regexp.MustCompile(`^unknown anchor '(.*)' referenced$`)
	// yaml.v3 numbers the lines of parser errors from 0 and those of scanner
	// errors from 1, and leaves the line out when it is the first.
	parserError = regexp.MustCompile(`^did not find expected (key|node content|',' or '\]'|',' or '\}'|'-' indicator|<document start>|<stream-end>)`)
)

// yamlDiagnostic turns a yaml.v3 syntax error into a diagnostic with the
// line it names.
func yamlDiagnostic(file string, data []byte, err error) Diagnostic {
	msg := err.Error()
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = te.Errors[0]
	}
	d := Diagnostic{File: file, Line: 1, Message: "malformed YAML: " + msg}
	m := yamlLine.FindStringSubmatch(msg)
	if m == nil {
		return d
	}
	d.Message = "malformed YAML: " + m[2]
	if m[1] != "" {
		d.Line, _ = strconv.Atoi(m[1])
		if parserError.MatchString(m[2]) {
			d.Line++
		}
	}
	if a := unknownAnch.FindStringSubmatch(m[2]); a != nil {
		if i := bytes.Index(data, []byte("*"+a[1])); i >= 0 {
			d.Line = 1 + bytes.Count(data[:i], []byte("\n"))
		}
	}
	return d
}

type parser struct {
	d *diags
	s *Spec
}

func at(n *yaml.Node) pos { return pos{line: n.Line, col: n.Column} }

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return "null"
		}
		return "a " + strings.TrimPrefix(n.Tag, "!!") + " " + strconv.Quote(n.Value)
	}
	return "something else"
}

// resolve follows aliases.
func resolve(n *yaml.Node) *yaml.Node {
	for i := 0; n != nil && n.Kind == yaml.AliasNode && i < 32; i++ {
		n = n.Alias
	}
	return n
}

// field is one key of a mapping the parser knows.
type field struct {
	name     string
	required bool
	parse    func(path string, v *yaml.Node)
}

// mapping walks a mapping node: every key must be one of fields, none may
// be given twice, and every required field must be there.
func (p *parser) mapping(path string, n *yaml.Node, fields []field) {
	n = resolve(n)
	if n.Kind != yaml.MappingNode {
		p.d.add(at(n), path, "want a mapping, got %s", kindName(n))
		return
	}
	seen := map[string]pos{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		if k.Kind == yaml.ScalarNode && k.Tag == "!!merge" {
			p.d.add(at(k), path, "merge keys (<<) are not supported in a spec")
			continue
		}
		key := k.Value
		fpath := join(path, key)
		if k.Kind != yaml.ScalarNode {
			p.d.add(at(k), path, "a key must be a plain name, got %s", kindName(k))
			continue
		}
		if first, dup := seen[key]; dup {
			p.d.add(at(k), fpath, "given twice (first at line %d)", first.line)
			continue
		}
		seen[key] = at(k)
		var f *field
		for j := range fields {
			if fields[j].name == key {
				f = &fields[j]
			}
		}
		if f == nil {
			p.d.add(at(k), fpath, "unknown field %q%s", key, suggest(key, fields))
			continue
		}
		p.s.at[fpath] = at(v)
		f.parse(fpath, v)
	}
	for _, f := range fields {
		if _, ok := seen[f.name]; f.required && !ok {
			p.d.add(at(n), join(path, f.name), "required field is missing")
		}
	}
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// suggest names the known fields, and the closest one if the key looks like
// a typo of it.
func suggest(key string, fields []field) string {
	names := make([]string, len(fields))
	best, bestD := "", 3
	for i, f := range fields {
		names[i] = f.name
		if d := editDistance(strings.ToLower(key), f.name); d < bestD {
			best, bestD = f.name, d
		}
	}
	if best != "" {
		return fmt.Sprintf(" (did you mean %q?)", best)
	}
	return " (known fields: " + strings.Join(names, ", ") + ")"
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// str reads a non-empty scalar. Numbers and booleans are taken as written
// only where allowAny is set (an environment value); elsewhere a string is
// wanted.
func (p *parser) str(path string, n *yaml.Node, allowAny bool) (string, bool) {
	n = resolve(n)
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		p.d.add(at(n), path, "want a string, got %s", kindName(n))
		return "", false
	}
	if !allowAny && n.Tag != "!!str" {
		p.d.add(at(n), path, "want a string, got %s (quote it)", kindName(n))
		return "", false
	}
	if n.Tag == "!!binary" {
		p.d.add(at(n), path, "binary values are not supported")
		return "", false
	}
	if !allowAny && strings.TrimSpace(n.Value) == "" {
		p.d.add(at(n), path, "must not be empty")
		return "", false
	}
	return n.Value, true
}

func (p *parser) strMap(path string, n *yaml.Node) map[string]string {
	n = resolve(n)
	if n.Kind != yaml.MappingNode {
		p.d.add(at(n), path, "want a mapping of names to strings, got %s", kindName(n))
		return nil
	}
	out := map[string]string{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		key, ok := p.str(path, k, false)
		if !ok {
			continue
		}
		fpath := path + "." + key
		if _, dup := out[key]; dup {
			p.d.add(at(k), fpath, "given twice")
			continue
		}
		p.s.at[fpath] = at(v)
		if val, ok := p.str(fpath, v, true); ok {
			out[key] = val
		}
	}
	return out
}

func (p *parser) root(n *yaml.Node) {
	s := p.s
	p.mapping("", n, []field{
		{"version", true, func(path string, v *yaml.Node) {
			if x, ok := p.str(path, v, true); ok {
				if x != Version {
					p.d.add(at(v), path, "unsupported version %q (this version reads %q)", x, Version)
				}
				s.Version = x
			}
		}},
		{"kind", true, func(path string, v *yaml.Node) {
			if x, ok := p.str(path, v, false); ok {
				if x != Kind {
					p.d.add(at(v), path, "unsupported kind %q (want %q)", x, Kind)
				}
				s.Kind = x
			}
		}},
		{"metadata", true, func(path string, v *yaml.Node) { p.metadata(path, v) }},
		{"container", true, func(path string, v *yaml.Node) { p.container(path, v) }},
	})
}

func (p *parser) metadata(path string, n *yaml.Node) {
	m := &p.s.Metadata
	p.mapping(path, n, []field{
		{"name", true, func(path string, v *yaml.Node) {
			if x, ok := p.str(path, v, false); ok {
				if !validLabel(x) {
					p.d.add(at(v), path, "invalid service name %q: use lowercase letters, digits and '-', start and end with a letter or digit, at most 63 characters", x)
				}
				m.Name = x
			}
		}},
		{"labels", false, func(path string, v *yaml.Node) { m.Labels = p.strMap(path, v) }},
		{"annotations", false, func(path string, v *yaml.Node) { m.Annotations = p.strMap(path, v) }},
	})
}

func (p *parser) container(path string, n *yaml.Node) {
	c := &p.s.Container
	p.mapping(path, n, []field{
		{"image", true, func(path string, v *yaml.Node) {
			if x, ok := p.str(path, v, false); ok {
				c.Image = x
			}
		}},
		{"pull_secret", false, func(path string, v *yaml.Node) {
			v = resolve(v)
			if v.Kind == yaml.ScalarNode && v.Tag == "!!null" {
				return // "pull_secret:" with no value: an anonymous pull
			}
			if x, ok := p.str(path, v, false); ok {
				c.PullSecret = x
			}
		}},
		{"secrets", false, func(path string, v *yaml.Node) {
			v = resolve(v)
			if v.Kind != yaml.SequenceNode {
				p.d.add(at(v), path, "want a list of secret names, got %s", kindName(v))
				return
			}
			for i, e := range v.Content {
				ipath := fmt.Sprintf("%s[%d]", path, i)
				p.s.at[ipath] = at(resolve(e))
				if x, ok := p.str(ipath, e, false); ok {
					c.Secrets = append(c.Secrets, x)
				} else {
					c.Secrets = append(c.Secrets, "")
				}
			}
		}},
		{"environment", false, func(path string, v *yaml.Node) {
			v = resolve(v)
			if v.Kind != yaml.SequenceNode {
				p.d.add(at(v), path, "want a list of {name, value} or {name, secret: {name, key}}, got %s", kindName(v))
				return
			}
			for i, e := range v.Content {
				ipath := fmt.Sprintf("%s[%d]", path, i)
				p.s.at[ipath] = at(resolve(e))
				c.Environment = append(c.Environment, p.env(ipath, e))
			}
		}},
	})
}

func (p *parser) env(path string, n *yaml.Node) EnvVar {
	var ev EnvVar
	hasValue := false
	p.mapping(path, n, []field{
		{"name", true, func(path string, v *yaml.Node) {
			if x, ok := p.str(path, v, false); ok {
				ev.Name = x
			}
		}},
		{"value", false, func(path string, v *yaml.Node) {
			hasValue = true
			if x, ok := p.str(path, v, true); ok {
				ev.Value = x
			}
		}},
		{"secret", false, func(path string, v *yaml.Node) {
			ref := &SecretKeyRef{}
			ev.Secret = ref
			p.mapping(path, v, []field{
				{"name", true, func(path string, v *yaml.Node) {
					if x, ok := p.str(path, v, false); ok {
						ref.Name = x
					}
				}},
				{"key", true, func(path string, v *yaml.Node) {
					if x, ok := p.str(path, v, false); ok {
						ref.Key = x
					}
				}},
			})
		}},
	})
	switch {
	case hasValue && ev.Secret != nil:
		p.d.add(p.s.pos(path+".secret"), path, "give either value or secret, not both")
	case !hasValue && ev.Secret == nil && resolve(n).Kind == yaml.MappingNode:
		p.d.add(at(resolve(n)), path, "give a value or a secret reference")
	}
	return ev
}

// validLabel matches an RFC 1123 label, like secret names.
func validLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}
