package spec

import (
	"fmt"
	"strings"
)

// Diagnostic is one problem found in a spec file, at a place in it.
type Diagnostic struct {
	File    string `json:"file"`
	Line    int    `json:"line,omitempty"`
	Column  int    `json:"column,omitempty"`
	Field   string `json:"field,omitempty"` // e.g. "container.pull_secret"
	Message string `json:"message"`
}

// String is "file:line:column: field: message", the form compilers use, so
// editors jump to the place.
func (d Diagnostic) String() string {
	var b strings.Builder
	b.WriteString(d.File)
	if d.Line > 0 {
		fmt.Fprintf(&b, ":%d", d.Line)
		if d.Column > 0 {
			fmt.Fprintf(&b, ":%d", d.Column)
		}
	}
	b.WriteString(": ")
	if d.Field != "" {
		b.WriteString(d.Field)
		b.WriteString(": ")
	}
	b.WriteString(d.Message)
	return b.String()
}

// Error is every error found in a spec file. A spec with errors has no
// plan. Warnings found along the way are kept apart.
type Error struct {
	Diagnostics []Diagnostic
	Warnings    []Diagnostic
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Diagnostics))
	for i, d := range e.Diagnostics {
		lines[i] = d.String()
	}
	return strings.Join(lines, "\n")
}

// pos is a place in the file.
type pos struct{ line, col int }

// diags collects diagnostics for one file.
type diags struct {
	file string
	list []Diagnostic
}

func (d *diags) add(p pos, field, format string, args ...any) {
	d.list = append(d.list, Diagnostic{File: d.file, Line: p.line, Column: p.col, Field: field, Message: fmt.Sprintf(format, args...)})
}

func (d *diags) err() error {
	if len(d.list) == 0 {
		return nil
	}
	return &Error{Diagnostics: d.list}
}
