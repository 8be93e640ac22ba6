package spec

import (
	"math"
	"strings"
)

// knownPrefixes are the prefixes of well-known credential formats.
var knownPrefixes = []struct{ prefix, what string }{
	{"ghp_", "a GitHub personal access token"},
	{"gho_", "a GitHub OAuth token"},
	{"ghu_", "a GitHub user-to-server token"},
	{"ghs_", "a GitHub server-to-server token"},
	{"ghr_", "a GitHub refresh token"},
	{"github_pat_", "a GitHub fine-grained token"},
	{"glpat-", "a GitLab personal access token"},
	{"gldt-", "a GitLab deploy token"},
	{"AKIA", "an AWS access key id"},
	{"ASIA", "an AWS temporary access key id"},
	{"xoxb-", "a Slack bot token"},
	{"xoxp-", "a Slack user token"},
	{"xoxa-", "a Slack app token"},
	{"xoxs-", "a Slack token"},
	{"xapp-", "a Slack app-level token"},
	{"sk-ant-", "an Anthropic API key"},
	{"sk-proj-", "an OpenAI project key"},
	{"sk-", "an API secret key (OpenAI style)"},
	{"sk_live_", "a Stripe secret key"},
	{"sk_test_", "a Stripe test secret key"},
	{"rk_live_", "a Stripe restricted key"},
	{"AIza", "a Google API key"},
	{"npm_", "an npm token"},
	{"pypi-", "a PyPI token"},
	{"hf_", "a Hugging Face token"},
	{"dckr_pat_", "a Docker Hub access token"},
	{"dop_v1_", "a DigitalOcean token"},
	{"SG.", "a SendGrid key"},
	{"-----BEGIN", "a PEM private key or certificate"},
}

// sensitiveNames are parts of variable names that usually hold secrets.
var sensitiveNames = []string{"PASSWORD", "PASSWD", "SECRET", "TOKEN", "API_KEY", "APIKEY", "PRIVATE_KEY", "ACCESS_KEY", "CREDENTIAL", "AUTH"}

// LooksLikeCredential reports whether a literal environment value looks
// like a credential, and why. It is a heuristic for a warning: a known
// token prefix, a JWT, a long high-entropy string, or any non-trivial value
// of a variable whose name says it is secret.
func LooksLikeCredential(name, value string) (bool, string) {
	v := strings.TrimSpace(value)
	if v == "" {
		return false, ""
	}
	for _, k := range knownPrefixes {
		rest, ok := strings.CutPrefix(v, k.prefix)
		if !ok {
			continue
		}
		// A bare prefix ("sk-", "AKIA") or a short word after it is not a key.
		if k.prefix == "-----BEGIN" || (len(rest) >= 12 && tokenChars(rest)) {
			return true, "it looks like " + k.what
		}
	}
	if isJWT(v) {
		return true, "it looks like a JSON Web Token"
	}
	if len(v) >= 20 && tokenChars(v) && entropy(v) >= 3.5 && classes(v) >= 2 {
		return true, "it is a long random-looking string"
	}
	upper := strings.ToUpper(name)
	for _, s := range sensitiveNames {
		if strings.Contains(upper, s) && len(v) >= 8 && !strings.ContainsAny(v, " \t") && !placeholder(v) {
			return true, "the variable's name says it holds a secret"
		}
	}
	return false, ""
}

// placeholder reports values that are obviously not secrets: booleans,
// numbers, file paths, URLs without user info.
func placeholder(v string) bool {
	l := strings.ToLower(v)
	switch l {
	case "true", "false", "yes", "no", "none", "null", "disabled", "enabled", "changeme":
		return true
	}
	if strings.HasPrefix(v, "/") || strings.HasPrefix(v, "./") {
		return true
	}
	if i := strings.Index(v, "://"); i > 0 {
		rest := v[i+3:]
		host, _, _ := strings.Cut(rest, "/")
		return !strings.Contains(host, "@")
	}
	return false
}

func tokenChars(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("+/=_-.", c) >= 0) {
			return false
		}
	}
	return true
}

func isJWT(s string) bool {
	parts := strings.Split(s, ".")
	return len(parts) == 3 && strings.HasPrefix(parts[0], "eyJ") && strings.HasPrefix(parts[1], "eyJ") && len(parts[2]) >= 16 && tokenChars(s)
}

// entropy is the Shannon entropy of s in bits per character.
func entropy(s string) float64 {
	var counts [256]int
	for i := 0; i < len(s); i++ {
		counts[s[i]]++
	}
	h := 0.0
	n := float64(len(s))
	for _, c := range counts {
		if c == 0 {
			continue
		}
		p := float64(c) / n
		h -= p * math.Log2(p)
	}
	return h
}

// classes counts the character classes (lower, upper, digit) in s.
func classes(s string) int {
	var lower, upper, digit bool
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z':
			lower = true
		case c >= 'A' && c <= 'Z':
			upper = true
		case c >= '0' && c <= '9':
			digit = true
		}
	}
	n := 0
	for _, b := range []bool{lower, upper, digit} {
		if b {
			n++
		}
	}
	return n
}
